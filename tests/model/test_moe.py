"""Expert-parallel MoE (shard_map + all_to_all) against the single-device layer, and
the capacity factor's drops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax import sharding as sh
from vesperjax.model.moe import MoE, capacity


def _moe(cf=None, expert_parallel=True):
  cfg = vj.ModelConfig(hidden_size=32, num_heads=2, num_layers=1, ffn_size=64,
                       vocab_size=128, lora_rank=4, lora_topk=2, num_experts=4, top_k=2,
                       moe_capacity_factor=cf)
  moe = MoE(cfg, nnx.Rngs(0), expert_parallel=expert_parallel)
  for i, lin in enumerate((moe.gate, moe.up)):  # give the adapters something to do
    lin.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), lin.lora_b.shape)
  return moe


def _run(graphdef, state, x):
  """(y, aux, grads, routing biases after the step) of sum(y^2) + balance loss."""
  def f(state, x):
    m = nnx.merge(graphdef, state)

    def loss(m):
      y, aux = m(x)
      return jnp.sum(y ** 2) + aux["load_balance_loss"], (y, aux)

    (_, (y, aux)), grads = nnx.value_and_grad(loss, has_aux=True)(m)
    return y, aux, grads, [m.gate.routing_bias[...], m.up.routing_bias[...]]
  return jax.jit(f)(state, x)


X = jax.random.normal(jax.random.key(2), (8, 12, 32))


@pytest.mark.parametrize("axes", [
    dict(data=2, expert=4),
    pytest.param(dict(fsdp=2, expert=2, tensor=2), marks=pytest.mark.slow)])
def test_expert_parallel_layer_equals_single_device(axes):
  graphdef, state = nnx.split(_moe())
  want = _run(graphdef, state, X)
  mesh = sh.make_mesh(**axes)
  with jax.set_mesh(mesh):
    placed = jax.device_put(state, sh.state_shardings(state, mesh))
    x = jax.device_put(X, sh.batch_sharding(mesh, ndim=3))
    got = _run(graphdef, placed, x)
    hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(placed, x).compile()
  assert "all-to-all" in hlo.as_text()
  assert float(got[1]["dropped_tokens"]) == 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.tree.map(np.asarray, want), jax.tree.map(np.asarray, got))


def test_batch_mesh_routes_each_devices_tokens_without_gathering_them():
  """No expert axis, the batch split 8 ways: each device routes its own tokens to all the
  experts inside a shard_map (no dispatch all_to_all): equal to the single-device layer, values,
  aux, gradients and routing biases, and less temporary memory than routing every
  device's tokens at once (expert_parallel=False), whose sort XLA cannot split."""
  graphdef, state = nnx.split(_moe())
  want = _run(graphdef, state, X)
  mesh = sh.make_mesh(data=2, fsdp=4)
  big = jax.random.normal(jax.random.key(3), (64, 32, 32))
  temp = {}
  with jax.set_mesh(mesh):
    placed = jax.device_put(state, sh.state_shardings(state, mesh))
    got = _run(graphdef, placed, jax.device_put(X, sh.batch_sharding(mesh, ndim=3)))
    for ep in (True, False):
      g, st = nnx.split(_moe(expert_parallel=ep))
      f = jax.jit(lambda s, x, g=g: nnx.merge(g, s)(x)[0])
      args = (jax.device_put(st, sh.state_shardings(st, mesh)),
              jax.device_put(big, sh.batch_sharding(mesh, ndim=3)))
      assert ("shard_map" in str(jax.make_jaxpr(f)(*args))) == ep
      temp[ep] = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               jax.tree.map(np.asarray, want), jax.tree.map(np.asarray, got))
  assert temp[True] < 0.5 * temp[False], temp


def test_expert_parallel_off_keeps_the_local_path_under_an_expert_mesh():
  want, _ = _moe()(X)
  mesh = sh.make_mesh(data=2, expert=4)
  texts, outs = {}, {}
  for ep in (True, False):
    graphdef, state = nnx.split(_moe(expert_parallel=ep))
    with jax.set_mesh(mesh):
      placed = jax.device_put(state, sh.state_shardings(state, mesh))
      x = jax.device_put(X, sh.batch_sharding(mesh, ndim=3))
      f = jax.jit(lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x)[0])
      texts[ep], outs[ep] = f.lower(placed, x).as_text(), f(placed, x)
  assert "all_to_all" in texts[True] and "all_to_all" not in texts[False]
  for y in outs.values():
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_capacity_drops_only_overflow_assignments():
  full = _moe()
  full.eval()
  tight = _moe(cf=0.5)
  tight.eval()
  x = X.reshape(-1, 32)
  y_full, _ = full(x)
  y, aux = tight(x)
  tokens = x.shape[0]
  cap = capacity(tight.config, tokens)
  routed = np.asarray(aux["expert_load"]) * tokens * 2
  want_dropped = np.maximum(routed - cap, 0).sum()
  assert float(aux["dropped_tokens"]) == pytest.approx(want_dropped) and want_dropped > 0
  # a token none of whose assignments overflowed gets exactly the dropless output
  probs = jax.nn.softmax(x @ full.router[...], -1)
  top_e = np.asarray(jax.lax.top_k(probs, 2)[1]).reshape(-1)
  seen = np.zeros(4, int)
  kept = np.zeros(top_e.shape, bool)
  for i, e in enumerate(top_e):  # assignments reach experts in token order
    kept[i] = seen[e] < cap
    seen[e] += 1
  whole = kept.reshape(tokens, 2).all(1)
  assert whole.any() and not whole.all()
  np.testing.assert_allclose(np.asarray(y)[whole], np.asarray(y_full)[whole], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(np.asarray(y)[~whole], np.asarray(y_full)[~whole])


def test_expert_parallel_capacity_is_per_device():
  """With a capacity, each device drops by its own tokens: the EP layer equals the
  single-device layer run on each device's share of the tokens."""
  moe = _moe(cf=0.75)
  moe.eval()
  graphdef, state = nnx.split(moe)
  mesh = sh.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh):
    placed = jax.device_put(state, sh.state_shardings(state, mesh))
    y, aux = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(
        placed, jax.device_put(X, sh.batch_sharding(mesh, ndim=3)))
  parts = [moe(part) for part in jnp.split(X, 8)]  # batch rows 8 -> one per device
  np.testing.assert_allclose(np.asarray(y), np.concatenate([np.asarray(p[0]) for p in parts]),
                             rtol=1e-5, atol=1e-6)
  assert float(aux["dropped_tokens"]) == sum(float(p[1]["dropped_tokens"]) for p in parts) > 0
