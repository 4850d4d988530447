"""Velvet against an independent float64 numpy reference written from DESIGN.md."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vesperjax import optim

V = 256  # ln V ~ 5.545


# ---------------------------------------------------------------- numpy reference

def np_scales(loss, entropy, *, ea=True, pg=True, vocab=V):
  """(es, ps) exactly as DESIGN.md states them; None = signal not given."""
  if loss is None:
    ps = 1.0
    loss_ok = True
  else:
    loss_ok = math.isfinite(loss)
    ps = min(max(40.0 / max(math.exp(min(loss, 20.0)), 1.0), 0.7), 1.3)
  if not loss_ok:
    return 1.0, 1.0
  sig = entropy if entropy is not None else loss
  if sig is None or not math.isfinite(sig) or not ea:
    es = 1.0
  else:
    lnv = math.log(vocab)
    es = min(max((min(sig, lnv) / lnv) / 0.5, 0.7), 1.3)
  return es, (ps if pg else 1.0)


class NpVelvet:
  """Float64 Velvet; one leaf list; sparse rule: exact-zero grad -> untouched.
  (Also the train step's reference in tests/training/test_train_step.py.)"""

  def __init__(self, params, lr=5e-4, b1=0.9, b2=0.999, eps=1e-8, wd=1e-3,
               max_norm=1.0, ea=True, pg=True, sparse=True, vocab=V):
    self.p = [np.asarray(x, np.float64) for x in params]
    self.m = [np.zeros_like(x) for x in self.p]
    self.v = [np.zeros_like(x) for x in self.p]
    self.lr, self.b1, self.b2, self.eps, self.wd = lr, b1, b2, eps, wd
    self.max_norm, self.ea, self.pg, self.sparse = max_norm, ea, pg, sparse
    self.vocab = vocab
    self.t = 0

  def step(self, grads, loss=None, entropy=None):
    lr = self.lr(self.t) if callable(self.lr) else self.lr
    self.t += 1
    t = self.t
    es, ps = np_scales(loss, entropy, ea=self.ea, pg=self.pg, vocab=self.vocab)
    # The in-graph scalars are fp32 (not float64): round them like it does,
    # else b1_t = 0.999 alone differs by 1.3e-5 in (1 - b1_t).
    f32 = lambda x: float(np.float32(x))
    es, ps = f32(es), f32(ps)
    lr_t = f32(f32(lr) * es)
    b1_t = f32(min(max(f32(self.b1) * ps, 0.5), 0.999) if self.pg else self.b1)
    g = [np.asarray(x, np.float64) for x in grads]
    norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
    if self.max_norm is not None and norm > self.max_norm:
      g = [x * (self.max_norm / norm) for x in g]
    for i, gi in enumerate(g):
      p, m, v = self.p[i], self.m[i], self.v[i]
      p1 = p * (1 - lr_t * self.wd)
      m1 = b1_t * m + (1 - b1_t) * gi
      v1 = self.b2 * v + (1 - self.b2) * gi * gi
      p1 = p1 - lr_t * (m1 / (1 - b1_t**t)) / (
          np.sqrt(v1 / (1 - self.b2**t)) + self.eps)
      if self.sparse:
        skip = gi == 0
        p1, m1, v1 = (np.where(skip, a, b) for a, b in ((p, p1), (m, m1), (v, v1)))
      self.p[i], self.m[i], self.v[i] = p1, m1, v1
    return dict(learning_rate=lr_t, b1=b1_t, entropy_scale=es,
                perplexity_scale=ps, grad_norm=norm)


# ---------------------------------------------------------------- helpers

def make_params(seed=0):
  r = np.random.RandomState(seed)
  return {"w": r.randn(4, 3).astype(np.float32),
          "b": np.zeros(3, np.float32),
          "e": r.randn(2, 5).astype(np.float32)}


def grads_seq(n, seed=1, scale=0.5, zero_frac=0.0):
  r = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    g = {k: (scale * r.randn(*s)).astype(np.float32)
         for k, s in (("w", (4, 3)), ("b", (3,)), ("e", (2, 5)))}
    if zero_frac:
      for k in g:
        g[k][r.rand(*g[k].shape) < zero_frac] = 0.0
    out.append(g)
  return out


KEYS = ("b", "e", "w")  # jax.tree.leaves order of the dicts


def run_velvet(tx, params, gseq, losses=None, entropies=None, jit=True):
  state = tx.init(params)
  upd = jax.jit(tx.update) if jit else tx.update
  stats = []
  for i, g in enumerate(gseq):
    kw = {}
    if losses is not None and losses[i] is not None:
      kw["loss"] = jnp.float32(losses[i])
    if entropies is not None and entropies[i] is not None:
      kw["entropy"] = jnp.float32(entropies[i])
    u, state = upd(g, state, params, **kw)
    params = optax.apply_updates(params, u)
    stats.append({k: float(v) for k, v in optim.velvet_stats(state).items()})
  return params, state, stats


def assert_params_close(params, ref, rtol=2e-5, atol=2e-6):
  for k, r in zip(KEYS, ref.p):
    np.testing.assert_allclose(np.asarray(params[k], np.float64), r,
                               rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------- tests

def test_matches_numpy_reference_with_signals():
  n = 60
  r = np.random.RandomState(7)
  losses = list(r.uniform(0.5, 8.0, n))
  losses[10] = float("nan")
  losses[11] = float("inf")
  entropies = [None] * n
  for i in range(20, 40):
    entropies[i] = float(r.uniform(0.0, 7.0))
  entropies[25] = float("nan")     # non-finite entropy: es neutral, ps not
  entropies[30] = 3.0
  losses[30] = float("nan")        # entropy given but loss NaN: both neutral
  gseq = grads_seq(n, scale=0.4)   # global norm ~1.8: clipped most steps
  params = make_params()
  tx = optim.velvet(learning_rate=1e-2, weight_decay=0.1, vocab_size=V)
  out, state, stats = run_velvet(tx, params, gseq, losses, entropies)

  ref = NpVelvet([params[k] for k in KEYS], lr=1e-2, wd=0.1)
  seen_es, seen_ps = set(), set()
  for i, g in enumerate(gseq):
    want = ref.step([g[k] for k in KEYS], losses[i], entropies[i])
    for key, val in want.items():
      assert stats[i][key] == pytest.approx(val, rel=1e-5), (i, key)
    seen_es.add(round(want["entropy_scale"], 6))
    seen_ps.add(round(want["perplexity_scale"], 6))
  assert_params_close(out, ref)
  # The run exercised both clamps of both scales and the neutral value.
  assert {0.7, 1.0, 1.3} <= seen_es and {0.7, 1.0, 1.3} <= seen_ps
  assert stats[10]["entropy_scale"] == stats[10]["perplexity_scale"] == 1.0
  assert stats[30]["entropy_scale"] == stats[30]["perplexity_scale"] == 1.0
  assert stats[25]["entropy_scale"] == 1.0
  assert int(state[1].count) == n


@pytest.mark.parametrize("max_grad_norm", [None, float("inf")])
@pytest.mark.parametrize("sparse_aware", [True, False])
def test_features_off_equals_adamw(max_grad_norm, sparse_aware):
  params = make_params()
  gseq = grads_seq(50)
  losses = list(np.random.RandomState(3).uniform(0.5, 8.0, 50))
  kw = dict(learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.05)
  tx = optim.velvet(**kw, max_grad_norm=max_grad_norm, entropy_adaptive=False,
                    perplexity_guided=False, sparse_aware=sparse_aware)
  ours, _, _ = run_velvet(tx, params, gseq, losses)  # signals are ignored
  theirs, _, _ = run_velvet(optax.adamw(**kw), params, gseq)
  for k in KEYS:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6)


def test_no_signals_is_adamw_even_with_features_on():
  params = make_params()
  gseq = grads_seq(30)
  tx = optim.velvet(learning_rate=1e-2, vocab_size=V, max_grad_norm=None)
  ours, _, stats = run_velvet(tx, params, gseq)
  theirs, _, _ = run_velvet(optax.adamw(1e-2, weight_decay=1e-3), params, gseq)
  for k in KEYS:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, atol=1e-6)
  assert stats[-1]["entropy_scale"] == stats[-1]["perplexity_scale"] == 1.0


def test_sparse_aware_lazy_rule():
  n = 20
  params = make_params()
  gseq = grads_seq(n, zero_frac=0.4)
  # One entry whose gradient is always exactly zero (an unused expert row).
  for g in gseq:
    g["e"][0, :] = 0.0
  losses = list(np.random.RandomState(4).uniform(1.0, 6.0, n))
  tx = optim.velvet(learning_rate=1e-2, weight_decay=0.1, vocab_size=V)
  out, state, _ = run_velvet(tx, params, gseq, losses)
  ref = NpVelvet([params[k] for k in KEYS], lr=1e-2, wd=0.1)
  for i, g in enumerate(gseq):
    ref.step([g[k] for k in KEYS], losses[i])
  assert_params_close(out, ref)
  # Never-touched row: no decay, no moments.
  np.testing.assert_array_equal(out["e"][0], params["e"][0])
  np.testing.assert_array_equal(state[1].mu["e"][0], 0.0)
  # The zero-initialised bias still trains (the original froze |p| < 1e-9).
  assert np.all(np.asarray(out["b"]) != 0.0)

  dense = optim.velvet(learning_rate=1e-2, weight_decay=0.1, vocab_size=V,
                       sparse_aware=False)
  out_dense, _, _ = run_velvet(dense, params, gseq, losses)
  assert np.all(np.asarray(out_dense["e"][0]) != np.asarray(params["e"][0]))


def test_sparse_aware_dense_grads_equal_to_off():
  # Equal up to XLA's fusion choices (a few ulp), not bitwise.
  params = make_params()
  gseq = grads_seq(20)
  losses = list(np.random.RandomState(5).uniform(1.0, 6.0, 20))
  a, _, _ = run_velvet(optim.velvet(vocab_size=V), params, gseq, losses)
  b, _, _ = run_velvet(optim.velvet(vocab_size=V, sparse_aware=False), params,
                       gseq, losses)
  for k in KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)


def test_sparse_mask_extra_arg():
  params = make_params()
  tx = optim.velvet(learning_rate=1e-2, vocab_size=V)
  state = tx.init(params)
  g = grads_seq(1)[0]
  smask = {"w": True, "b": True, "e": jnp.array([[True], [False]])}  # per row
  u, state = jax.jit(tx.update)(g, state, params, loss=2.0, sparse_mask=smask)
  np.testing.assert_array_equal(u["e"][1], 0.0)
  np.testing.assert_array_equal(state[1].nu["e"][1], 0.0)
  assert np.all(np.asarray(u["e"][0]) != 0.0)
  with pytest.raises(ValueError, match="sparse_aware"):
    off = optim.velvet(vocab_size=V, sparse_aware=False)
    off.update(g, off.init(params), params, sparse_mask=smask)


def test_scale_clamp_boundaries():
  lnv = math.log(V)
  def es(x):
    return float(optim.velvet_scales(5.0, x, vocab_size=V).entropy_scale)
  def ps(loss):
    return float(optim.velvet_scales(loss, vocab_size=V).perplexity_scale)
  assert es(0.0) == pytest.approx(0.7)
  assert es(0.35 * lnv) == pytest.approx(0.7)
  assert es(0.30 * lnv) == pytest.approx(0.7)           # below: clamped
  assert es(0.5 * lnv) == pytest.approx(1.0)
  assert es(0.6 * lnv) == pytest.approx(1.2)            # inside the band
  assert es(0.65 * lnv) == pytest.approx(1.3)
  assert es(3 * lnv) == pytest.approx(1.3)              # min(L, ln V) -> 2 -> 1.3
  assert ps(-3.0) == pytest.approx(1.3)                 # exp < 1 -> max(., 1)
  assert ps(math.log(40 / 1.3)) == pytest.approx(1.3, rel=1e-5)
  assert ps(math.log(40.0)) == pytest.approx(1.0, rel=1e-5)
  assert ps(math.log(40 / 0.7)) == pytest.approx(0.7, rel=1e-5)
  assert ps(1e4) == pytest.approx(0.7)                  # min(loss, 20) guards exp
  for bad in (float("nan"), float("inf"), -float("inf")):
    s = optim.velvet_scales(bad, 2.0, vocab_size=V)
    assert float(s.entropy_scale) == float(s.perplexity_scale) == 1.0
  b1 = lambda b, p: float(optim.adapted_b1(b, jnp.float32(p)))
  assert b1(0.9, 1.3) == pytest.approx(0.999)           # 1.17 -> 0.999
  assert b1(0.6, 0.7) == pytest.approx(0.5)             # 0.42 -> 0.5
  assert b1(0.9, 0.7) == pytest.approx(0.63)
  assert float(optim.adapted_b1(0.9995, 1.0, perplexity_guided=False)) == (
      pytest.approx(0.9995))


def test_entropy_adaptive_needs_vocab_size():
  with pytest.raises(ValueError, match="vocab_size"):
    optim.velvet()
  optim.velvet(entropy_adaptive=False)  # fine without V


def test_learning_rate_schedule():
  sched = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 5, 40, 1e-4)
  params = make_params()
  gseq = grads_seq(40)
  losses = list(np.random.RandomState(6).uniform(1.0, 6.0, 40))
  tx = optim.velvet(sched, vocab_size=V, weight_decay=0.1)
  out, _, stats = run_velvet(tx, params, gseq, losses)
  ref = NpVelvet([params[k] for k in KEYS], lr=lambda s: float(sched(s)),
                 wd=0.1)
  for i, g in enumerate(gseq):
    want = ref.step([g[k] for k in KEYS], losses[i])
    assert stats[i]["learning_rate"] == pytest.approx(want["learning_rate"],
                                                      rel=1e-5, abs=1e-12)
  assert_params_close(out, ref)
  # With the features off the schedule lines up with optax.adamw's.
  kw = dict(weight_decay=0.1)
  off = optim.velvet(sched, **kw, max_grad_norm=None, entropy_adaptive=False,
                     perplexity_guided=False)
  a, _, _ = run_velvet(off, params, gseq, losses)
  b, _, _ = run_velvet(optax.adamw(sched, **kw), params, gseq)
  for k in KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_jit_traces_once_and_signals_stay_on_device():
  params = make_params()
  tx = optim.velvet(vocab_size=V)
  traces = []

  @jax.jit
  def step(params, state, g, loss, entropy):
    traces.append(1)
    u, state = tx.update(g, state, params, loss=loss, entropy=entropy)
    return optax.apply_updates(params, u), state, optim.velvet_stats(state)

  state = tx.init(params)
  for i, g in enumerate(grads_seq(5)):
    params, state, stats = step(params, state, g, jnp.float32(1.0 + i),
                                jnp.float32(2.0))
  assert len(traces) == 1
  assert set(stats) == {"learning_rate", "b1", "entropy_scale",
                        "perplexity_scale", "grad_norm"}


def test_state_shapes_and_dtypes_bf16_grads():
  params = make_params()
  tx = optim.velvet(vocab_size=V)
  state = tx.init(params)
  g32 = grads_seq(3)
  g16 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g) for g in g32]
  # bf16 grads are upcast before any math (clipping included), so they give
  # the numbers of the same values fed as fp32.
  g16_as32 = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g)
              for g in g16]
  a, sa, _ = run_velvet(tx, params, g16, [2.0] * 3)
  b, _, _ = run_velvet(tx, params, g16_as32, [2.0] * 3)
  for k in KEYS:
    assert a[k].dtype == jnp.float32
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
  vstate = sa[1]
  for k in KEYS:
    assert vstate.mu[k].shape == params[k].shape
    assert vstate.mu[k].dtype == vstate.nu[k].dtype == jnp.float32
  for x in (vstate.learning_rate, vstate.b1, vstate.entropy_scale,
            vstate.perplexity_scale, sa[0].grad_norm):
    assert x.shape == () and x.dtype == jnp.float32
  assert state[1].count.dtype == jnp.int32


def test_weight_decay_mask():
  params = make_params()
  gseq = grads_seq(10)
  mask = lambda p: {k: v.ndim > 1 for k, v in p.items()}
  kw = dict(learning_rate=1e-2, weight_decay=0.1, mask=mask)
  a, _, _ = run_velvet(optim.velvet(**kw, max_grad_norm=None,
                                    entropy_adaptive=False,
                                    perplexity_guided=False), params, gseq)
  b, _, _ = run_velvet(optax.adamw(**kw), params, gseq)
  for k in KEYS:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_fused_matches_reference():
  kernels = pytest.importorskip("vesperjax.kernels._velvet_update")
  del kernels
  from vesperjax import kernels as vk  # pylint: disable=g-import-not-at-top
  params = make_params()
  gseq = grads_seq(4, zero_frac=0.3)
  losses = [1.0, 3.0, float("nan"), 6.0]
  ref, _, _ = run_velvet(optim.velvet(vocab_size=V), params, gseq, losses)
  vk.set_default_impl("pallas")  # interpret mode on CPU: exercises the kernel
  try:
    out, _, _ = run_velvet(optim.velvet(vocab_size=V, fused=True), params, gseq,
                           losses)
  finally:
    vk.set_default_impl(None)
  for k in KEYS:
    np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-7)
