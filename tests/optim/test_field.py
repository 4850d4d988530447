"""The trainer's optimizer choices (vesperjax/optim/field.py): each is the optax optimizer
it names, behind the same clipping; Muon gets exactly the hidden matrices; schedule-free
runs are evaluated on their averaged iterate; AdEMAMix's b3 warmup is the paper's."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax import contrib

from vesperjax.config import model_preset
from vesperjax.model import VesperLM, trainable_filter
from vesperjax.optim import field
from vesperjax.run_config import OptimConfig, RunConfig, validate


def small_params(preset="tiny", **kw):
  cfg = model_preset(preset, num_layers=1, vocab_size=64, hidden_size=32, ffn_size=64,
                     num_heads=2, lora_rank=4, lora_topk=2, **kw)
  model = VesperLM(cfg, rngs=nnx.Rngs(0))
  return nnx.split(model, trainable_filter(cfg), ...)[1]


def leaf_names(tree, is_leaf=None):
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    out["/".join(n for n in names if n != "value")] = x
  return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_muon_gets_the_hidden_matrices_and_adamw_the_rest(preset):
  params = small_params(preset)
  dims = leaf_names(field.muon_dimension_numbers(params),
                    is_leaf=lambda x: x is None or isinstance(x, contrib.MuonDimensionNumbers))
  muon = {k for k, d in dims.items() if d is not None}
  want = {"blocks/attn/qkv_kernel", "blocks/attn/out_kernel", "blocks/ffn/down_kernel",
          "blocks/ffn/gate/kernel", "blocks/ffn/up/kernel", "blocks/ffn/gate/lora_b",
          "blocks/ffn/up/lora_b"}
  assert muon == want
  assert dims["blocks/attn/qkv_kernel"].reduction_axis == (-4,)  # q, k, v apart
  assert dims["blocks/attn/out_kernel"].reduction_axis == (-3, -2)


def test_muon_orthogonalises_each_matrix():
  """One step from zero momentum on a random gradient: each Muon matrix's update has
  (nearly) equal singular values, as Newton-Schulz gives; AdamW's leaves do not."""
  params = small_params()
  opt = OptimConfig(name="muon", lr=1.0, warmup_steps=0, min_lr_ratio=1.0,
                    weight_decay=0.0, max_grad_norm=1e9)
  tx = field.make_optimizer(opt, 10, 64)
  key = jax.random.key(0)
  grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  up = leaf_names(updates)
  s = np.linalg.svd(np.asarray(up["blocks/ffn/gate/kernel"][0]), compute_uv=False)
  assert s.min() / s.max() > 0.5  # Newton-Schulz's quintic lands in ~[0.7, 1.2]
  # the update's RMS follows consistent_rms: 0.2 * sqrt(max(fan_in, fan_out)) * ~1/sqrt(n)
  rms = float(jnp.sqrt(jnp.mean(up["blocks/ffn/gate/kernel"] ** 2)))
  assert 0.1 < rms < 0.3
  s_embed = np.linalg.svd(np.asarray(up["embed"]), compute_uv=False)
  assert s_embed.min() / s_embed.max() < 0.5


@pytest.mark.parametrize("name", ["adamw", "muon", "schedule_free_adamw", "ademamix"])
def test_each_choice_trains_a_quadratic(name):
  """Every choice lowers a least-squares loss, with clipping first and the extra args
  accepted (and ignored)."""
  r = np.random.RandomState(0)
  a, b = jnp.asarray(r.randn(16, 8), jnp.float32), jnp.asarray(r.randn(16, 4), jnp.float32)
  params = {"blocks": {"ffn": {"up": {"kernel": jnp.zeros((8, 4))}}}}
  loss = lambda p: jnp.mean((a @ p["blocks"]["ffn"]["up"]["kernel"] - b) ** 2)
  opt = OptimConfig(name=name, lr=3e-2, warmup_steps=5, weight_decay=0.0)
  tx = field.make_optimizer(opt, 200, 64)
  state = tx.init(params)
  start = float(loss(params))

  @jax.jit
  def step(params, state):
    u, state = tx.update(jax.grad(loss)(params), state, params, loss=jnp.float32(1.0),
                         entropy=jnp.float32(1.0))
    return optax.apply_updates(params, u), state
  for _ in range(200):
    params, state = step(params, state)
  assert float(loss(field.eval_params(state, params))) < 0.7 * start


def test_schedule_free_is_evaluated_on_its_averaged_iterate():
  params = {"w": jnp.ones(3)}
  opt = OptimConfig(name="schedule_free_adamw", lr=0.1, warmup_steps=0)
  tx = field.make_optimizer(opt, 10, 64)
  state = tx.init(params)
  for i in range(3):
    u, state = tx.update({"w": jnp.full(3, 1.0 + i)}, state, params)
    params = optax.apply_updates(params, u)
  sf = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, contrib.ScheduleFreeState)) if isinstance(s, contrib.ScheduleFreeState)][0]
  want = (params["w"] - (1 - sf.b1) * sf.z["w"]) / sf.b1  # x from y and z (optax docs)
  np.testing.assert_allclose(field.eval_params(state, params)["w"], want, rtol=1e-6)
  assert not np.allclose(want, params["w"])
  adamw = field.make_optimizer(OptimConfig(name="adamw"), 10, 64)
  assert field.eval_params(adamw.init(params), params) is params


def test_ademamix_b3_warmup_is_the_papers():
  sched = field.ademamix_b3_schedule(0.9999, 0.9, 100)
  assert float(sched(0)) == pytest.approx(0.9, rel=1e-6)
  assert float(sched(100)) == pytest.approx(0.9999, rel=1e-6)
  assert float(sched(1000)) == pytest.approx(0.9999, rel=1e-6)
  # halfway, by hand: exp(ln .9 ln .9999 / (0.5 ln .9999 + 0.5 ln .9))
  l0, l1 = math.log(0.9), math.log(0.9999)
  assert float(sched(50)) == pytest.approx(math.exp(l0 * l1 / (0.5 * l1 + 0.5 * l0)),
                                           rel=1e-6)


def test_entropy_lr_multiplies_any_optimizer_by_velvets_entropy_scale():
  params = {"w": jnp.ones(4)}
  g = {"w": jnp.full(4, 0.5)}
  plain = field.make_optimizer(OptimConfig(name="adamw", warmup_steps=0), 10, 256)
  scaled = field.make_optimizer(OptimConfig(name="adamw", warmup_steps=0,
                                            entropy_lr=True), 10, 256)
  u0, _ = plain.update(g, plain.init(params), params, loss=jnp.float32(3.0))
  # entropy 0.4 ln V: es = 0.8
  u1, _ = scaled.update(g, scaled.init(params), params, loss=jnp.float32(3.0),
                        entropy=jnp.float32(0.4 * math.log(256)))
  np.testing.assert_allclose(u1["w"], 0.8 * u0["w"], rtol=1e-5)


@pytest.mark.parametrize("optim, message", [
    (dict(name="sgd"), "optim.name"),
    (dict(velvet_rules="fancy"), "optim.velvet_rules"),
    (dict(velvet_rules="original:b1_max=2"), "optim.velvet_rules"),
    (dict(name="velvet", entropy_lr=True), "optim.entropy_lr"),
])
def test_bad_optim_config_is_one_line(optim, message):
  with pytest.raises(ValueError, match=message):
    validate(RunConfig().replace(optim=optim))
