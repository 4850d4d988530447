"""Fused Velvet update (Pallas, interpret mode on CPU) against pure-JAX references."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vesperjax.kernels import velvet_update as vu

HP = dict(b2=0.999, eps=1e-8, weight_decay=1e-3)


def _tree(key, shapes, pdtype=jnp.float32, gdtype=jnp.float32):
  ks = jax.random.split(key, len(shapes))
  params = {f"w{i}": jax.random.normal(k, s, pdtype) for i, (k, s) in enumerate(zip(ks, shapes))}
  return params


def _grads(key, params, gdtype, zero_frac=0.0):
  leaves, td = jax.tree.flatten(params)
  ks = jax.random.split(key, 2 * len(leaves))
  out = []
  for i, p in enumerate(leaves):
    g = jax.random.normal(ks[2 * i], p.shape, jnp.float32)
    if zero_frac:
      g = jnp.where(jax.random.uniform(ks[2 * i + 1], p.shape) < zero_frac, 0.0, g)
    out.append(g.astype(gdtype))
  return jax.tree.unflatten(td, out)


def _optim_reference():
  try:
    mod = importlib.import_module("vesperjax.optim.velvet")
  except ImportError:
    return None
  return getattr(mod, "velvet_update_reference", None)


def _run(fn, params, steps, key, gdtype, skip, zero_frac=0.0, **kw):
  mu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  nu = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  step = jax.jit(lambda p, g, m, v, lr, b1, c: fn(
      p, g, m, v, lr=lr, b1=b1, count=c, skip_zero_grads=skip, **HP, **kw))
  traj = []
  for t in range(1, steps + 1):
    g = _grads(jax.random.fold_in(key, t), params, gdtype, zero_frac)
    lr = jnp.float32(1e-2 * (0.9 + 0.1 * np.sin(t)))  # traced, changes every step
    b1 = jnp.float32(0.9 - 0.01 * (t % 3))
    u, mu, nu = step(params, g, mu, nu, lr, b1, jnp.int32(t))
    params = jax.tree.map(lambda p, d: (p + d).astype(p.dtype), params, u)
    traj.append((u, mu, nu))
  return params, traj, step


def _close(a, b, rtol=2e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


SHAPES = [(37, 53), (1001,), (3, 5, 7), (1,), (64, 129), (0,), (17,)]


@pytest.mark.parametrize("skip", [False, True])
def test_matches_reference_20_steps(skip):
  key = jax.random.key(0)
  params = _tree(key, SHAPES)
  kern = lambda *a, **k: vu.velvet_update(*a, impl="pallas", interpret=True, **k)
  p1, tr1, step = _run(kern, params, 20, key, jnp.float32, skip, zero_frac=0.3 if skip else 0)
  p0, tr0, _ = _run(vu.velvet_update_reference_jnp, params, 20, key, jnp.float32, skip,
                    zero_frac=0.3 if skip else 0)
  _close(p1, p0)
  for a, b in zip(tr1, tr0):
    _close(a, b)
  # step scalars are inputs, not constants: one compile for 20 different steps
  assert step._cache_size() == 1
  ref = _optim_reference()
  if ref is not None:
    p2, tr2, _ = _run(ref, params, 20, key, jnp.float32, skip, zero_frac=0.3 if skip else 0)
    _close(p1, p2)


def test_skip_zero_grads_keeps_state():
  params = {"a": jnp.ones((300,)), "b": jnp.ones((7, 9))}
  g = jax.tree.map(lambda p: jnp.zeros_like(p).at[..., 0].set(1.0), params)
  m = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
  v = jax.tree.map(lambda p: jnp.full(p.shape, 0.25), params)
  u, m1, v1 = vu.velvet_update(params, g, m, v, lr=0.1, b1=0.9, count=jnp.int32(3),
                               skip_zero_grads=True, impl="pallas", interpret=True, **HP)
  for uu, mm, vv in zip(jax.tree.leaves(u), jax.tree.leaves(m1), jax.tree.leaves(v1)):
    assert np.all(np.asarray(uu)[..., 1:] == 0)
    assert np.all(np.asarray(mm)[..., 1:] == 0.5) and np.all(np.asarray(vv)[..., 1:] == 0.25)
    assert np.all(np.asarray(uu)[..., 0] != 0)


def test_equals_optax_adamw():
  """Constant lr/b1, no skipping: same numbers as optax.adamw."""
  key = jax.random.key(1)
  params = _tree(key, [(33, 65), (257,)])
  tx = optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-3)
  st = tx.init(params)
  mu = jax.tree.map(jnp.zeros_like, params)
  nu = jax.tree.map(jnp.zeros_like, params)
  p_ref, p_k = params, params
  for t in range(1, 6):
    g = _grads(jax.random.fold_in(key, t), params, jnp.float32)
    u_ref, st = tx.update(g, st, p_ref)
    u, mu, nu = vu.velvet_update(p_k, g, mu, nu, lr=1e-2, b1=0.9, count=jnp.int32(t),
                                 impl="pallas", interpret=True, **HP)
    _close(u, u_ref, rtol=3e-5, atol=1e-8)
    p_ref = optax.apply_updates(p_ref, u_ref)
    p_k = optax.apply_updates(p_k, u)
  _close(p_k, p_ref, rtol=3e-5, atol=1e-6)  # fp32 vs float64 (1 - b2), see _scalars


def test_mixed_dtypes_and_small_blocks():
  """bf16 grads and bf16 params form their own buckets; many grid steps per bucket."""
  key = jax.random.key(2)
  params = {"f": _tree(key, [(21, 67), (301,)]),
            "h": _tree(jax.random.fold_in(key, 1), [(40, 31)], pdtype=jnp.bfloat16)}
  g = _grads(jax.random.fold_in(key, 9), params, jnp.bfloat16)
  m = jax.tree.map(lambda p: 0.1 * jnp.ones(p.shape, jnp.float32), params)
  v = jax.tree.map(lambda p: 0.2 * jnp.ones(p.shape, jnp.float32), params)
  kw = dict(lr=jnp.float32(1e-3), b1=jnp.float32(0.9), count=jnp.int32(4), **HP)
  out = jax.jit(lambda *a: vu.velvet_update(*a, impl="pallas", interpret=True, block_size=1024,
                                           **kw))(params, g, m, v)
  ref = vu.velvet_update_reference_jnp(params, g, m, v, **kw)
  _close(out[1:], ref[1:])
  assert out[0]["h"]["w0"].dtype == jnp.bfloat16
  _close(out[0], ref[0], rtol=1e-2, atol=1e-6)


def test_auto_falls_back_on_cpu(monkeypatch):
  from vesperjax import kernels
  params = {"a": jnp.ones((5,))}
  called = []
  real = vu.velvet_update_flat
  monkeypatch.setattr(vu, "velvet_update_flat", lambda *a, **k: called.append(1) or real(*a, **k))
  z = jax.tree.map(jnp.zeros_like, params)
  kw = dict(lr=0.1, b1=0.9, count=1, **HP)
  vu.velvet_update(params, params, z, z, **kw)
  assert not called
  kernels.set_default_impl("pallas")
  try:
    vu.velvet_update(params, params, z, z, **kw)
  finally:
    kernels.set_default_impl(None)
  assert called


def test_under_shard_map():
  """Per-shard kernel call inside jax.shard_map over 8 simulated CPU devices."""
  n = len(jax.devices())
  assert n >= 2
  mesh = jax.make_mesh((n,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  key = jax.random.key(3)
  params = {"a": jax.random.normal(key, (n * 37, 11)), "b": jax.random.normal(key, (n * 5,)),
            "r": jax.random.normal(key, (13,))}  # replicated leaf
  specs = {"a": P("x"), "b": P("x"), "r": P()}
  g = _grads(jax.random.fold_in(key, 1), params, jnp.float32)
  m = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  v = jax.tree.map(lambda p: 0.2 * jnp.ones_like(p), params)
  put = lambda t: jax.tree.map(lambda x, s: jax.device_put(x, jax.NamedSharding(mesh, s)), t, specs)
  kw = dict(b2=0.999, eps=1e-8, weight_decay=1e-3)

  @jax.jit
  def step(p, g, m, v, lr, b1, c):
    f = lambda p, g, m, v, lr, b1, c: vu.velvet_update(
        p, g, m, v, lr=lr, b1=b1, count=c, impl="pallas", interpret=True, **kw)
    return jax.shard_map(f, mesh=mesh, in_specs=(specs, specs, specs, specs, P(), P(), P()),
                         out_specs=(specs, specs, specs), check_vma=False)(p, g, m, v, lr, b1, c)

  out = step(put(params), put(g), put(m), put(v), jnp.float32(1e-2), jnp.float32(0.9), jnp.int32(2))
  ref = vu.velvet_update_reference_jnp(params, g, m, v, lr=jnp.float32(1e-2), b1=jnp.float32(0.9),
                                       count=jnp.int32(2), **kw)
  assert out[0]["a"].sharding.spec == P("x")
  _close(out, ref)
