"""Velvet's rules (original and corrected) against a float64 numpy reference written from
the equations in vesperjax/optim/velvet_rules.py's docstring; their parsing; the split
blocks and the fused kernel carrying the new state."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vesperjax import optim
from vesperjax.optim import velvet_rules
from vesperjax.optim.velvet_rules import VelvetRules

V = 256


class NpRules:
  """Float64 Velvet with the rules' knobs; one leaf list, no sparse rule (dense grads)."""

  def __init__(self, params, rules, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, wd=0.1):
    self.p = [np.asarray(x, np.float64) for x in params]
    self.m = [np.zeros_like(x) for x in self.p]
    self.v = [np.zeros_like(x) for x in self.p]
    self.rules, self.lr, self.b1, self.b2, self.eps, self.wd = rules, lr, b1, b2, eps, wd
    self.t = 0
    self.prod = 1.0
    # [loss fast, loss slow, entropy fast]: value and weight
    self.ema, self.w = [0.0] * 3, [0.0] * 3

  def signals(self, loss, entropy):
    r = self.rules
    decays = [r.signal_decay, r.trend_decay, r.signal_decay]
    loss_ok = loss is not None and math.isfinite(loss)
    ent_ok = entropy is not None and math.isfinite(entropy) and loss_ok
    for i, (x, ok) in enumerate(((loss, loss_ok), (loss, loss_ok), (entropy, ent_ok))):
      if ok:
        self.ema[i] = decays[i] * self.ema[i] + (1 - decays[i]) * x
        self.w[i] = decays[i] * self.w[i] + (1 - decays[i])
    mean = [e / w if w > 0 else 0.0 for e, w in zip(self.ema, self.w)]
    return mean, loss_ok, ent_ok

  def step(self, grads, loss, entropy):
    r = self.rules
    self.t += 1
    (fast, slow, ent), loss_ok, ent_ok = self.signals(loss, entropy)
    clip = lambda x, lo, hi: min(max(x, lo), hi)
    es = clip((min(ent, math.log(V)) / math.log(V)) / 0.5, 0.7, 1.3) if ent_ok else 1.0
    if not loss_ok:
      ps = 1.0
    elif r.perplexity_signal == "trend":
      ps = clip(math.exp(slow - fast), 0.7, 1.3)
    else:
      ps = clip(40 / max(math.exp(min(fast, 20)), 1), 0.7, 1.3)
    # the in-graph scalars are fp32: round them as it does (at b1 near 0.999, 1 - b1
    # alone differs by 1e-5 relative otherwise)
    f32 = lambda x: float(np.float32(x))
    es, ps = f32(es), f32(ps)
    raw = self.b1 * ps if r.b1_rule == "beta" else 1 - (1 - self.b1) / ps
    b1_t = f32(clip(raw, r.b1_min, r.b1_max))
    self.prod = f32(self.prod * b1_t)
    bc1 = 1 - self.prod if r.bias_correction == "product" else 1 - b1_t ** self.t
    lr_t = f32(self.lr * es)
    for i, g in enumerate(grads):
      g = np.asarray(g, np.float64)
      self.m[i] = b1_t * self.m[i] + (1 - b1_t) * g
      self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
      d = (self.m[i] / bc1) / (np.sqrt(self.v[i] / (1 - self.b2 ** self.t)) + self.eps)
      self.p[i] = self.p[i] - lr_t * (self.wd * self.p[i] + d)
    return dict(b1=b1_t, entropy_scale=es, perplexity_scale=ps, learning_rate=lr_t)


def _problem(n=80, seed=0):
  r = np.random.RandomState(seed)
  params = {"a": r.randn(3, 4).astype(np.float32), "b": r.randn(5).astype(np.float32)}
  grads = [{"a": (0.3 * r.randn(3, 4)).astype(np.float32),
            "b": (0.3 * r.randn(5)).astype(np.float32)} for _ in range(n)]
  # a falling loss with batch noise, crossing the original's thresholds, one NaN
  losses = list(6.0 - 3.5 * np.linspace(0, 1, n) ** 0.5 + 0.3 * r.randn(n))
  entropies = list(np.clip(np.array(losses) - 0.4 + 0.2 * r.randn(n), 0.1, None))
  if n > 40:
    losses[17] = float("nan")
    entropies[40] = float("inf")
  return params, grads, losses, entropies


RULES = {
    "original": velvet_rules.ORIGINAL,
    "corrected": velvet_rules.CORRECTED,
    "product": VelvetRules(bias_correction="product"),
    "smoothed": VelvetRules(signal_decay=0.9),
    "trend": VelvetRules(perplexity_signal="trend", signal_decay=0.8, trend_decay=0.95),
    "horizon": VelvetRules(b1_rule="horizon"),
    "ceiling": VelvetRules(b1_max=0.95),
}


@pytest.mark.parametrize("name", list(RULES))
def test_rules_match_numpy_reference(name):
  rules = RULES[name]
  params, grads, losses, entropies = _problem()
  tx = optim.velvet(1e-2, weight_decay=0.1, vocab_size=V, max_grad_norm=None, rules=rules)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref = NpRules([params["a"], params["b"]], rules)
  b1s = []
  for i, g in enumerate(grads):
    u, state = update(g, state, params, loss=jnp.float32(losses[i]),
                      entropy=jnp.float32(entropies[i]))
    params = optax.apply_updates(params, u)
    want = ref.step([g["a"], g["b"]], losses[i], entropies[i])
    got = optim.velvet_stats(state)
    for key, val in want.items():
      assert float(got[key]) == pytest.approx(val, rel=2e-5, abs=1e-6), (name, i, key)
    b1s.append(want["b1"])
  for got, want in zip((params["a"], params["b"]), ref.p):
    # fp32 moving averages against float64 ones: ~1e-5 of the 80 steps' total motion
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=5e-5)
  assert len(set(np.round(b1s, 6))) > 3, "the rule never moved b1"  # not vacuous


def test_original_preset_is_the_default_and_the_name_works():
  params, grads, losses, _ = _problem(20)
  outs = []
  for rules in (None, "original", velvet_rules.ORIGINAL):
    kw = {} if rules is None else {"rules": rules}
    tx = optim.velvet(1e-2, vocab_size=V, **kw)
    state, p = tx.init(params), params
    for g, loss in zip(grads, losses):
      u, state = tx.update(g, state, p, loss=jnp.float32(loss))
      p = optax.apply_updates(p, u)
    outs.append(p)
  for other in outs[1:]:
    for k in params:
      np.testing.assert_array_equal(outs[0][k], other[k])


def test_product_correction_equals_step_correction_for_a_constant_b1():
  """With the perplexity rule off, b1 is constant and prod b1 = b1^t: both corrections
  are Adam's (and the optimizer is optax.adamw)."""
  params, grads, losses, _ = _problem(40)
  tx = optim.velvet(3e-3, weight_decay=0.05, max_grad_norm=None, entropy_adaptive=False,
                    perplexity_guided=False, rules="original:bias_correction=product")
  ref = optax.adamw(3e-3, weight_decay=0.05)
  s1, s2, p1, p2 = tx.init(params), ref.init(params), params, params
  for g, loss in zip(grads, losses):
    u1, s1 = tx.update(g, s1, p1, loss=jnp.float32(loss))
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for k in params:
    np.testing.assert_allclose(p1[k], p2[k], rtol=1e-5, atol=1e-6)


def test_trend_is_scale_free():
  """Adding a constant to every loss (another tokenizer or corpus) leaves the trend
  rule's b1 unchanged; the original rule's moves."""
  params, grads, losses, _ = _problem(30)
  def b1s(rules, shift):
    tx = optim.velvet(1e-2, vocab_size=V, entropy_adaptive=False, rules=rules)
    state, out = tx.init(params), []
    for g, loss in zip(grads, losses):
      _, state = tx.update(g, state, params, loss=jnp.float32(loss + shift))
      out.append(float(optim.velvet_stats(state)["b1"]))
    return np.array(out)
  trend = "original:perplexity_signal=trend,signal_decay=0.8,trend_decay=0.95"
  np.testing.assert_allclose(b1s(trend, 0.0), b1s(trend, 2.0), atol=1e-5)
  assert np.abs(b1s("original", 0.0) - b1s("original", 2.0)).max() > 0.05


def test_split_blocks_with_rules_equal_the_whole_step():
  params, grads, losses, entropies = _problem(30)
  rules = velvet_rules.CORRECTED
  whole = optim.velvet(1e-2, weight_decay=0.0, vocab_size=V, max_grad_norm=None,
                       rules=rules)
  split = optax.chain(optim.scale_by_velvet_moments(rules=rules),
                      optim.scale_by_velvet_learning_rate(1e-2, vocab_size=V, rules=rules))
  outs = []
  for tx in (whole, split):
    state, p = tx.init(params), params
    for i, g in enumerate(grads):
      u, state = tx.update(g, state, p, loss=jnp.float32(losses[i]),
                           entropy=jnp.float32(entropies[i]))
      p = optax.apply_updates(p, u)
    outs.append(p)
  for k in params:
    np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-7)


def test_fused_kernel_takes_the_product_correction():
  from vesperjax.kernels import velvet_update
  r = np.random.RandomState(3)
  params = {"w": jnp.asarray(r.randn(300), jnp.float32)}
  grads = {"w": jnp.asarray(r.randn(300), jnp.float32)}
  mu = {"w": jnp.asarray(r.randn(300), jnp.float32)}
  nu = {"w": jnp.asarray(r.rand(300), jnp.float32)}
  kw = dict(lr=1e-2, b1=0.95, b2=0.999, eps=1e-8, weight_decay=0.1,
            count=jnp.int32(7), bc1=jnp.float32(0.4))
  ref = optim.velvet_update_reference(params, grads, mu, nu, **kw)
  got = velvet_update(params, grads, mu, nu, impl="triton", interpret=True, **kw)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # and bc1 is used: the default 1 - 0.95^7 gives another update
  other = optim.velvet_update_reference(params, grads, mu, nu,
                                        **{**kw, "bc1": None})[0]["w"]
  assert np.abs(np.asarray(other) - np.asarray(ref[0]["w"])).max() > 1e-4


def test_state_survives_inject_hyperparams_and_multisteps():
  params, grads, losses, _ = _problem(8)
  tx = optax.MultiSteps(optax.inject_hyperparams(optim.velvet)(
      learning_rate=1e-2, vocab_size=V, rules="corrected"), every_k_schedule=2)
  state = tx.init(params)
  for g, loss in zip(grads, losses):
    _, state = jax.jit(tx.update)(g, state, params, loss=jnp.float32(loss))
  inner = state.inner_opt_state.inner_state[1]
  assert float(inner.signals.weight[0]) > 0 and float(inner.b1_product) < 1


@pytest.mark.parametrize("spec, message", [
    ("newest", "expected one of"),
    ("original:b1_max", "is not FIELD=VALUE"),
    ("original:colour=red", "is not FIELD=VALUE"),
    ("original:b1_max=high", "is not a number"),
    ("original:b1_max=1.5", "b1_max"),
    ("original:b1_rule=sideways", "b1_rule"),
    ("corrected:signal_decay=1", "signal_decay"),
])
def test_bad_rules_are_one_clear_error(spec, message):
  with pytest.raises(ValueError, match=message):
    optim.velvet(vocab_size=V, rules=spec)


def test_rules_parse_into_fields():
  r = velvet_rules.resolve_rules("corrected:b1_max=0.95,bias_correction=step")
  assert r.b1_max == 0.95 and r.bias_correction == "step"
  assert r.signal_decay == velvet_rules.CORRECTED.signal_decay


def test_masked_passes_the_signal_to_the_corrected_rules():
  params, grads, losses, _ = _problem(6)
  tx = optax.masked(optim.velvet(1e-2, vocab_size=V, rules="corrected"),
                    {"a": True, "b": False}, mask_compatible_extra_args=True)
  whole = optim.velvet(1e-2, vocab_size=V, rules="corrected")
  s1, s2 = tx.init(params), whole.init({"a": params["a"]})
  for g, loss in zip(grads, losses):
    u1, s1 = tx.update(g, s1, params, loss=jnp.float32(loss))
    u2, s2 = whole.update({"a": g["a"]}, s2, {"a": params["a"]}, loss=jnp.float32(loss))
    np.testing.assert_array_equal(u1["b"], g["b"])  # masked out: passed through
    np.testing.assert_allclose(u1["a"], u2["a"], rtol=1e-6)
  assert float(optim.velvet_stats(s1)["b1"]) != 0.9


def test_corrected_rules_on_a_mesh_fused_and_not():
  """The fused kernel per shard (shardings=) with the corrected rules equals the unfused
  optimizer on the same 8-device mesh; the new scalars stay replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vesperjax import kernels
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  r = np.random.RandomState(1)
  params = {"w": jnp.asarray(r.randn(64, 24), jnp.float32),
            "b": jnp.asarray(r.randn(24), jnp.float32)}
  sh = {"w": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P())}
  p0 = jax.device_put(params, sh)
  kw = dict(learning_rate=1e-2, weight_decay=0.1, vocab_size=V, rules="corrected")
  grads = [jax.device_put({k: jnp.asarray(r.randn(*v.shape), jnp.float32) * 0.1
                           for k, v in params.items()}, sh) for _ in range(3)]
  outs = []
  kernels.set_default_impl("pallas")  # interpret mode on CPU
  try:
    for tx in (optim.velvet(fused=True, shardings=sh, **kw), optim.velvet(**kw)):
      step = jax.jit(lambda g, s, p, loss, tx=tx: tx.update(g, s, p, loss=loss))
      state, p = tx.init(p0), p0
      for g, loss in zip(grads, (5.0, 4.6, 4.1)):
        u, state = step(g, state, p, jnp.float32(loss))
        p = optax.apply_updates(p, u)
      outs.append((p, state[1]))
  finally:
    kernels.set_default_impl(None)
  (p_fused, s_fused), (p_plain, s_plain) = outs
  for k in params:
    np.testing.assert_allclose(p_fused[k], p_plain[k], rtol=1e-5, atol=1e-7)
    assert p_fused[k].sharding.is_equivalent_to(sh[k], params[k].ndim)
  assert float(s_fused.b1_product) == pytest.approx(float(s_plain.b1_product), rel=1e-6)
  assert s_fused.signals.ema.sharding.is_fully_replicated
