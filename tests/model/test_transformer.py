"""VesperLM: shapes, causality, parameter counts, FlyLoRA, MoE dispatch, KV cache, learning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.model import FrozenProjection, RoutingBias
from vesperjax.kernels import era_reference as era

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
            max_seq_len=64, lora_rank=8, lora_topk=2)


def tiny(**overrides):
  return vj.ModelConfig(**{**TINY, **overrides})


@nnx.jit
def forward(model, toks):
  return model(toks)


def tokens(seed, shape=(2, 12), vocab=64):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("experts", [0, 4])
def test_shapes_and_aux(experts):
  cfg = tiny(num_experts=experts, top_k=2)
  model = vj.VesperLM(cfg, rngs=nnx.Rngs(0))
  logits, aux = forward(model, tokens(1))
  assert logits.shape == (2, 12, 64) and logits.dtype == jnp.float32
  if experts:
    assert aux["load_balance_loss"].shape == ()
    load = np.asarray(aux["expert_load"])
    assert load.shape == (cfg.num_layers, experts)
    np.testing.assert_allclose(load.sum(-1), 1.0, rtol=1e-6)
  else:
    assert aux == {}


@pytest.mark.parametrize("experts", [0, 4])
def test_causal(experts):
  model = vj.VesperLM(tiny(num_experts=experts), rngs=nnx.Rngs(3))
  model.eval()  # freeze the routing biases so both calls see the same model
  rng = np.random.default_rng(20 + experts)
  x = np.asarray(tokens(int(rng.integers(1 << 30))))
  j = int(rng.integers(1, x.shape[1]))
  y = x.copy()
  y[:, j] = (y[:, j] + 1 + rng.integers(62)) % 64
  a, _ = forward(model, jnp.asarray(x))
  b, _ = forward(model, jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(a[:, :j]), np.asarray(b[:, :j]))
  assert not np.allclose(np.asarray(a[:, j:]), np.asarray(b[:, j:]))


@pytest.mark.parametrize("name", vj.PRESET_NAMES)
@pytest.mark.parametrize("freeze_base", [False, True])
def test_num_params_matches_model(name, freeze_base):
  cfg = vj.model_preset(name, freeze_base=freeze_base)
  abstract = nnx.eval_shape(lambda: vj.VesperLM(cfg, rngs=nnx.Rngs(0)))
  trainable = nnx.state(abstract, vj.trainable_filter(cfg))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
  assert counted == vj.num_params(cfg)


def test_preset_dims_and_overrides():
  cfg = vj.model_preset("xlarge", vocab_size=50304)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.ffn_size) == (2048, 24, 16, 5504)
  assert vj.model_preset("large_moe").num_experts == 16
  assert 0.9e9 < vj.num_params(cfg) < 1.5e9  # the ~1B preset


@pytest.mark.parametrize("field,overrides", [
    ("hidden_size", dict(hidden_size=30, num_heads=4)),
    ("top_k", dict(num_experts=4, top_k=5)),
    ("lora_topk", dict(lora_rank=4, lora_topk=8)),
    ("num_layers", dict(num_layers=0)),
    ("remat", dict(remat="sometimes")),
    ("dtype", dict(dtype="float8")),
    ("lora_density", dict(lora_density=0.0)),
    ("freeze_base", dict(lora_rank=0, freeze_base=True)),
])
def test_invalid_config_names_field(field, overrides):
  with pytest.raises(ValueError, match=rf"\b{field}\b"):
    tiny(**overrides)


def test_unknown_preset_and_field():
  with pytest.raises(ValueError, match="unknown model preset"):
    vj.model_preset("huge")
  with pytest.raises(ValueError, match="hidden"):
    vj.model_preset("tiny", hidden=3)


def test_config_json_round_trip():
  cfg = vj.model_preset("tiny-moe", vocab_size=8192)
  assert vj.ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_saved_config_with_the_removed_pallas_attention_loads_with_the_default():
  saved = {**dataclasses.asdict(vj.model_preset("tiny", vocab_size=512)),
           "attention_impl": "pallas"}
  assert vj.ModelConfig.from_dict(saved).attention_impl is None
  with pytest.raises(ValueError, match="attention_impl"):  # never accepted when given
    vj.model_preset("tiny", vocab_size=512, attention_impl="pallas")


def test_flylora_projection_frozen_sparse_and_out_of_params():
  cfg = tiny(hidden_size=64, lora_rank=8, lora_density=0.25)
  model = vj.VesperLM(cfg, rngs=nnx.Rngs(5))
  a = np.asarray(model.blocks.ffn.gate.lora_a[...])  # [L, D, r]
  assert a.shape == (cfg.num_layers, 64, 8)
  # every rank (column) reads exactly int(0.25 * 64) = 16 inputs, std ~ 1/r
  np.testing.assert_array_equal((a != 0).sum(1), 16)
  assert abs(a[a != 0].std() - 1 / 8) < 0.03
  params = nnx.state(model, nnx.Param)
  assert not any("lora_a" in "/".join(map(str, p)) for p, _ in nnx.to_flat_state(params))

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  before = jax.tree.map(np.asarray, nnx.state(model, FrozenProjection))
  lora_b_before = np.asarray(model.blocks.ffn.gate.lora_b[...])

  def loss_fn(m):
    logits, _ = m(tokens(6))
    return jnp.mean(logits ** 2)

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(loss_fn)(model))

  for _ in range(3):
    step(model, opt)
  after = jax.tree.map(np.asarray, nnx.state(model, FrozenProjection))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert not np.allclose(model.blocks.ffn.gate.lora_b[...], lora_b_before)


def test_flylora_rank_topk_and_zero_init():
  """At init B = 0, so gate(x) is the base linear; exactly k ranks are active per token."""
  from vesperjax.model.layers import FlyLoRALinear, rank_topk_mask
  cfg = tiny(lora_rank=8, lora_topk=3)
  layer = FlyLoRALinear(32, 48, cfg, nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(7), (5, 32))
  base = x @ layer.kernel[...] + layer.bias[...]
  np.testing.assert_allclose(layer(x), base, rtol=1e-6, atol=1e-6)

  y = x @ layer.lora_a[...]
  bias = jax.random.normal(jax.random.key(8), (8,)) * 0.1
  mask = np.asarray(rank_topk_mask(y, bias, 3))
  np.testing.assert_array_equal(mask.sum(-1), 3)
  scores = np.abs(np.asarray(y) + np.asarray(bias))
  for row, m in zip(scores, mask):
    assert set(np.flatnonzero(m)) == set(np.argsort(-row)[:3])

  # with a non-zero B the adapter adds (alpha / r) B (mask * Ax)
  layer.lora_b[...] = jax.random.normal(jax.random.key(9), (8, 48))
  layer.eval()
  mask = np.asarray(rank_topk_mask(y, layer.routing_bias[...], 3))
  want = np.asarray(base) + cfg.lora_scale * (np.asarray(y) * mask) @ np.asarray(layer.lora_b[...])
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_routing_bias_balances_ranks_without_gradients():
  from vesperjax.model.layers import FlyLoRALinear
  cfg = tiny(lora_rank=8, lora_topk=2, lora_bias_rate=0.05)
  layer = FlyLoRALinear(32, 16, cfg, nnx.Rngs(4))
  x = jax.random.normal(jax.random.key(1), (256, 32)) + 2.0  # skewed inputs
  y = np.asarray(x @ layer.lora_a[...])

  def usage():
    from vesperjax.model.layers import rank_topk_mask
    return np.asarray(rank_topk_mask(jnp.asarray(y), layer.routing_bias[...], 2)).sum(0)

  spread_before = usage().std()
  call = nnx.jit(lambda layer, x: layer(x))
  for _ in range(60):
    call(layer, x)
  assert usage().std() < spread_before
  layer.eval()
  frozen = np.asarray(layer.routing_bias[...])
  layer(x)
  np.testing.assert_array_equal(frozen, layer.routing_bias[...])


def naive_moe(moe, x):
  """Every expert on every token, then keep the top-k with renormalised weights."""
  c = moe.config
  x = np.asarray(x, np.float64).reshape(-1, c.hidden_size)
  logits = x @ np.asarray(moe.router[...])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  g = lambda a: np.asarray(a[...], np.float64)

  def proj(lin, e):
    out = x @ g(lin.kernel)[e] + g(lin.bias)[e]
    y = x @ g(lin.lora_a)[e]
    score = np.abs(y + g(lin.routing_bias)[e])
    keep = np.argsort(-score, axis=-1)[:, :c.lora_topk]
    mask = np.zeros_like(y)
    np.put_along_axis(mask, keep, 1.0, -1)
    return out + c.lora_scale * (y * mask) @ g(lin.lora_b)[e]

  out = np.zeros_like(x)
  for e in range(c.num_experts):
    gate = np.asarray(era(jnp.asarray(proj(moe.gate, e)), c.era_gamma), np.float64)
    h = gate * proj(moe.up, e)
    y_e = h @ g(moe.down_kernel)[e] + g(moe.down_bias)[e]
    for t in range(x.shape[0]):
      top = np.argsort(-probs[t])[:c.top_k]
      if e in top:
        out[t] += probs[t, e] / probs[t, top].sum() * y_e[t]
  return out, probs


def test_moe_equals_every_expert_reference():
  from vesperjax.model.moe import MoE
  cfg = tiny(num_experts=4, top_k=2, lora_rank=8, lora_topk=2)
  moe = MoE(cfg, nnx.Rngs(7))
  for lin in (moe.gate, moe.up):  # give the adapters and biases something to do
    lin.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(1), lin.lora_b.shape)
    lin.routing_bias[...] = 0.05 * jax.random.normal(jax.random.key(2), lin.routing_bias.shape)
  moe.down_bias[...] = 0.1 * jax.random.normal(jax.random.key(3), moe.down_bias.shape)
  moe.eval()
  x = jax.random.normal(jax.random.key(4), (3, 7, 32))
  y, aux = nnx.jit(lambda m, x: m(x))(moe, x)
  want, probs = naive_moe(moe, x)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), want, rtol=2e-4, atol=2e-5)

  top = np.argsort(-probs, -1)[:, :2]
  f = np.bincount(top.ravel(), minlength=4) / top.size
  np.testing.assert_allclose(aux["expert_load"], f, rtol=1e-6)
  np.testing.assert_allclose(aux["load_balance_loss"], 4 * np.sum(f * probs.mean(0)),
                             rtol=1e-5)


def test_moe_gradients_reach_only_routed_experts():
  from vesperjax.model.moe import MoE
  cfg = tiny(num_experts=4, top_k=1)
  moe = MoE(cfg, nnx.Rngs(0))
  moe.eval()
  # route every token to expert 2 by making its router column dominant
  moe.router[...] = moe.router[...].at[:, 2].add(5.0)
  x = jnp.abs(jax.random.normal(jax.random.key(1), (6, 32)))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2)))(moe)
  g = np.asarray(grads["down_kernel"][...])
  assert np.abs(g[2]).sum() > 0
  np.testing.assert_array_equal(g[[0, 1, 3]], 0.0)


@pytest.mark.parametrize("experts,scan", [(0, True), (2, True), (2, False)])
def test_kv_cache_decode_equals_full_forward(experts, scan):
  model = vj.VesperLM(tiny(num_experts=experts, scan_layers=scan), rngs=nnx.Rngs(11))
  model.eval()
  seq = tokens(12, (2, 10))
  full, _ = forward(model, seq)

  @nnx.jit
  def extend(model, toks, cache):
    h, _, cache = model.hidden_states(toks, cache=cache)
    return model.logits(h), cache

  logits, cache = extend(model, seq[:, :6], model.init_cache(2, 16))  # prefill
  steps = [logits]
  for t in range(6, 10):
    logits, cache = extend(model, seq[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "dots_no_batch"])
def test_remat_matches_no_remat(policy):
  def loss_and_grads(cfg):
    model = vj.VesperLM(cfg, rngs=nnx.Rngs(1))
    model.eval()

    def loss_fn(m):
      logits, _ = m(tokens(2))
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens(3)).mean()

    return nnx.jit(nnx.value_and_grad(loss_fn))(model)

  (l0, g0), (l1, g1) = loss_and_grads(tiny()), loss_and_grads(tiny(remat=policy))
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               nnx.state(g0), nnx.state(g1))


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_rows_matmul_matches_autodiff(dtype, tol):
  """The down projection's matmul (CPU: weight gradient via a materialised x.T) has the
  value and gradients of a plain x @ w."""
  from vesperjax.kernels import rows_matmul
  x = jax.random.normal(jax.random.key(0), (12, 8)).astype(dtype)
  w = jax.random.normal(jax.random.key(1), (8, 5)).astype(dtype)
  dy = jax.random.normal(jax.random.key(2), (12, 5)).astype(dtype)
  y, vjp = jax.vjp(rows_matmul, x, w)
  y_ref, vjp_ref = jax.vjp(lambda a, b: a @ b, x, w)
  for got, want in zip((y, *vjp(dy)), (y_ref, *vjp_ref(dy))):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


@pytest.mark.parametrize("experts", [0, 4])
def test_unrolled_layers_match_scan(experts):
  """scan_layers=False runs the same stacked parameters: loss, aux, every gradient and
  the gradient-free routing-bias updates equal the scan's."""
  def run(cfg):
    model = vj.VesperLM(cfg, rngs=nnx.Rngs(1))  # train mode: routing biases move

    def loss_fn(m):
      logits, aux = m(tokens(2))
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens(3)).mean()
      return ce + aux.get("load_balance_loss", 0.0), aux

    (loss, aux), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    return loss, aux, nnx.state(grads), nnx.state(model, RoutingBias)

  scanned, unrolled = run(tiny(num_experts=experts)), run(
      tiny(num_experts=experts, scan_layers=False))
  assert np.abs(jax.tree.leaves(scanned[3])[0]).max() > 0  # the biases did move
  np.testing.assert_allclose(scanned[0], unrolled[0], rtol=1e-6)
  for a, b in zip(scanned[1:], unrolled[1:]):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_bf16_compute_keeps_fp32_params_and_logits():
  model = vj.VesperLM(tiny(dtype="bfloat16"), rngs=nnx.Rngs(0))
  logits, _ = forward(model, tokens(0))
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  ref, _ = forward(vj.VesperLM(tiny(), rngs=nnx.Rngs(0)), tokens(0))
  np.testing.assert_allclose(logits, ref, atol=0.05)


def test_freeze_base_trains_only_adapters():
  cfg = tiny(freeze_base=True)
  model = vj.VesperLM(cfg, rngs=nnx.Rngs(0))
  trainable = nnx.state(model, vj.trainable_filter(cfg))
  paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
  assert paths and all(p.endswith("lora_b") for p in paths)
  assert sum(x.size for x in jax.tree.leaves(trainable)) == vj.num_params(cfg)


@pytest.mark.parametrize("experts", [0, 2])
def test_tiny_model_overfits_repeated_sequence(experts):
  cfg = tiny(num_experts=experts, top_k=1)
  model = vj.VesperLM(cfg, rngs=nnx.Rngs(0))
  seq = jnp.tile(jnp.arange(8) * 7 % 64, 3)[None, :]  # period-8 pattern
  x, y = seq[:, :-1], seq[:, 1:]
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss_fn(m):
      logits, _ = m(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  first = float(step(model, opt))
  for _ in range(150):
    loss = float(step(model, opt))
  assert first > 3.5 and loss < 0.2, (first, loss)
