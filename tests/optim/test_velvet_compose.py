"""Velvet inside optax wrappers: extra args (loss=, entropy=) must reach it."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vesperjax import optim

V = 256


def params_and_grads(n=6, seed=0):
  r = np.random.RandomState(seed)
  params = {"base": jnp.asarray(r.randn(4, 3), jnp.float32),
            "lora_b": jnp.zeros((3, 2), jnp.float32)}
  grads = [{"base": jnp.asarray(r.randn(4, 3) * 0.3, jnp.float32),
            "lora_b": jnp.asarray(r.randn(3, 2) * 0.3, jnp.float32)}
           for _ in range(n)]
  return params, grads


def run(tx, params, grads, losses, entropy=None):
  state = tx.init(params)
  upd = jax.jit(tx.update)
  for g, loss in zip(grads, losses):
    kw = {"loss": jnp.float32(loss)}
    if entropy is not None:
      kw["entropy"] = jnp.float32(entropy)
    u, state = upd(g, state, params, **kw)
    params = optax.apply_updates(params, u)
  return params, state


def close(a, b, rtol=1e-6, atol=1e-7):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol,
                                                       atol=atol), a, b)


LOSSES = [1.0, 2.5, 4.0, 6.0, 3.0, 0.8]


def test_chain_passes_extra_args():
  params, grads = params_and_grads()
  ref, ref_state = run(optim.velvet(vocab_size=V), params, grads, LOSSES, 2.0)
  out, state = run(optax.chain(optax.identity(), optim.velvet(vocab_size=V)),
                   params, grads, LOSSES, 2.0)
  close(out, ref)
  stats = optim.velvet_stats(state)
  assert float(stats["entropy_scale"]) == pytest.approx(2.0 / np.log(V) / 0.5)
  assert float(stats["perplexity_scale"]) == pytest.approx(1.3)  # loss 0.8


def test_custom_chain_from_building_blocks_equals_velvet():
  """Split blocks + optax.add_decayed_weights == velvet on dense gradients."""
  params, grads = params_and_grads()
  sched = optax.linear_schedule(1e-2, 1e-3, 6)
  custom = optax.chain(
      optim.clip_by_global_norm_with_stats(0.5),
      optim.scale_by_velvet_moments(0.9, 0.999, 1e-8),
      optax.add_decayed_weights(0.1),
      optim.scale_by_velvet_learning_rate(sched, vocab_size=V))
  ref, _ = run(optim.velvet(sched, weight_decay=0.1, max_grad_norm=0.5,
                            vocab_size=V), params, grads, LOSSES, 3.0)
  out, state = run(custom, params, grads, LOSSES, 3.0)
  close(out, ref, rtol=1e-5, atol=1e-6)
  assert set(optim.velvet_stats(state)) == {
      "grad_norm", "b1", "perplexity_scale", "learning_rate", "entropy_scale"}


def test_inject_hyperparams():
  params, grads = params_and_grads()
  sched = optax.cosine_decay_schedule(1e-2, 6)
  tx = optax.inject_hyperparams(optim.velvet)(learning_rate=sched,
                                              vocab_size=V, weight_decay=0.1)
  ref, _ = run(optim.velvet(sched, vocab_size=V, weight_decay=0.1), params,
               grads, LOSSES, 2.0)
  out, state = run(tx, params, grads, LOSSES, 2.0)
  close(out, ref)
  stats = optim.velvet_stats(state)
  es = 2.0 / np.log(V) / 0.5
  assert float(stats["learning_rate"]) == pytest.approx(float(sched(5)) * es,
                                                        rel=1e-5)
  # A non-scheduled hyperparameter can be changed in the state (lr override).
  tx2 = optax.inject_hyperparams(optim.velvet)(learning_rate=1e-2,
                                               vocab_size=V)
  st = tx2.init(params)
  st.hyperparams["learning_rate"] = jnp.float32(0.0)
  st.hyperparams["weight_decay"] = jnp.float32(0.0)
  u, st = jax.jit(tx2.update)(grads[0], st, params, loss=2.0)
  close(u, jax.tree.map(jnp.zeros_like, u))


def test_multisteps_gradient_accumulation():
  """k micro-steps with a running-mean loss == one step on the mean gradient."""
  params, grads = params_and_grads(6)
  k = 3
  ms = optax.MultiSteps(optim.velvet(vocab_size=V), every_k_schedule=k)
  state = ms.init(params)
  upd = jax.jit(ms.update)
  p = params
  losses = LOSSES
  for i, g in enumerate(grads):
    window = losses[(i // k) * k:i + 1]
    u, state = upd(g, state, p, loss=jnp.float32(np.mean(window)))
    p = optax.apply_updates(p, u)
  mean_g = [jax.tree.map(lambda *x: sum(x) / k, *grads[j:j + k])
            for j in range(0, 6, k)]
  mean_l = [np.mean(losses[j:j + k]) for j in range(0, 6, k)]
  ref, _ = run(optim.velvet(vocab_size=V), params, mean_g, mean_l)
  close(p, ref, rtol=1e-5, atol=1e-6)
  assert int(state.inner_opt_state[1].count) == 2
  assert float(optim.velvet_stats(state)["perplexity_scale"]) == pytest.approx(
      min(max(40 / np.exp(mean_l[-1]), 0.7), 1.3), rel=1e-5)


def test_multi_transform_adapter_only():
  params, grads = params_and_grads()
  labels = {"base": "frozen", "lora_b": "adapter"}
  tx = optax.multi_transform(
      {"adapter": optim.velvet(vocab_size=V), "frozen": optax.set_to_zero()},
      labels)
  out, state = run(tx, params, grads, LOSSES, 2.0)
  np.testing.assert_array_equal(out["base"], params["base"])
  # Zero-initialised LoRA B trains (not frozen by the original's |p| rule).
  sub = lambda t: {"lora_b": t["lora_b"]}
  ref, _ = run(optim.velvet(vocab_size=V), sub(params), [sub(g) for g in grads],
               LOSSES, 2.0)
  close(out["lora_b"], ref["lora_b"])
  assert np.all(np.asarray(out["lora_b"]) != 0)
  assert "entropy_scale" in optim.velvet_stats(state)


def test_masked_with_sparse_mask_extra_arg():
  params, grads = params_and_grads(1)
  mask = {"base": False, "lora_b": True}
  tx = optax.masked(optim.velvet(vocab_size=V), mask,
                    mask_compatible_extra_args=True)
  state = tx.init(params)
  smask = {"base": True, "lora_b": jnp.array([[True], [False], [True]])}
  u, state = jax.jit(tx.update)(grads[0], state, params, loss=2.0,
                                sparse_mask=smask)
  np.testing.assert_array_equal(u["base"], grads[0]["base"])  # passed through
  np.testing.assert_array_equal(u["lora_b"][1], 0.0)          # skipped row
  assert np.all(np.asarray(u["lora_b"][0]) != 0)
  assert isinstance(state.inner_state[1].mu["base"], optax.MaskedNode)
  assert float(optim.velvet_stats(state)["perplexity_scale"]) == pytest.approx(
      min(40 / np.exp(2.0), 1.3))


def test_apply_if_finite():
  params, grads = params_and_grads(2)
  tx = optax.apply_if_finite(optim.velvet(vocab_size=V), 2)
  state = tx.init(params)
  upd = jax.jit(tx.update)
  bad = jax.tree.map(lambda g: g.at[0, 0].set(jnp.nan), grads[0])
  u, state2 = upd(bad, state, params, loss=jnp.float32(jnp.nan))
  close(u, jax.tree.map(jnp.zeros_like, u))
  assert int(state2.inner_state[1].count) == 0
  u, state3 = upd(grads[1], state2, params, loss=1.0)
  assert int(state3.inner_state[1].count) == 1
  assert float(optim.velvet_stats(state3)["perplexity_scale"]) == (
      pytest.approx(1.3))


def test_nnx_optimizer_forwards_extra_args():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optim.velvet(vocab_size=V), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss_fn(m):
      return jnp.mean((m(x) - y) ** 2)
    loss, g = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, g, loss=loss)
    return loss

  x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
  before = model.kernel[...]
  step(model, opt, x, y)
  assert not np.allclose(model.kernel[...], before)
  stats = optim.velvet_stats(opt.opt_state)
  assert float(stats["perplexity_scale"]) == pytest.approx(1.3)  # small loss


def test_state_follows_param_sharding():
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices")
  mesh = jax.make_mesh((2, 2), ("a", "b"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:4])
  params = {"w": jax.device_put(jnp.ones((4, 6)), NamedSharding(mesh, P("a", "b"))),
            "v": jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P("a")))}
  tx = optim.velvet(vocab_size=V)
  state = tx.init(params)
  u, state = jax.jit(tx.update)(params, state, params, loss=1.0)
  for k in params:
    for tree in (state[1].mu, state[1].nu, u):
      assert tree[k].sharding.is_equivalent_to(params[k].sharding, params[k].ndim)
