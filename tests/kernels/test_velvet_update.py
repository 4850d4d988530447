"""Fused Velvet update (Pallas, interpret mode on CPU) against pure-JAX references."""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from vesperjax.kernels import _velvet_update as vu

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


def _optim_module():
  return importlib.import_module("vesperjax.optim.velvet")


def _optim_reference():
  return _optim_module().velvet_update_reference


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
    # blocking: Mosaic GPU's interpreter runs JAX ops in host callbacks, which wait
    # behind any work dispatched meanwhile (CPU runs programs in order): a deadlock
    u, mu, nu = jax.block_until_ready(step(params, g, mu, nu, lr, b1, jnp.int32(t)))
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
  # and both against float64 numpy written from the update's formula (the pure-JAX path
  # is the optimizer's own reference: comparing with it alone would not be independent)
  want = _numpy_run(params, 20, key, skip, zero_frac=0.3 if skip else 0)
  for name, got in (("kernel", p1), ("jnp", p0)):
    for k in want:
      np.testing.assert_allclose(np.asarray(got[k], np.float64), want[k], rtol=1e-5,
                                 atol=2e-6, err_msg=f"{name} {k}")


def _numpy_run(params, steps, key, skip, zero_frac):
  """`_run`'s 20 steps (same gradients and per-step lr, b1) in float64 numpy:
  m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
  p -= lr (wd p + (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)); with `skip`, an
  entry whose gradient is exactly 0 keeps p, m and v."""
  f32 = lambda x: float(np.float32(x))  # the kernel's scalars are fp32
  b2, eps, wd = f32(HP["b2"]), f32(HP["eps"]), f32(HP["weight_decay"])
  p = {k: np.asarray(x, np.float64) for k, x in params.items()}
  m = {k: np.zeros_like(x) for k, x in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t in range(1, steps + 1):
    g = _grads(jax.random.fold_in(key, t), params, jnp.float32, zero_frac)
    lr, b1 = f32(1e-2 * (0.9 + 0.1 * np.sin(t))), f32(0.9 - 0.01 * (t % 3))
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m1 = b1 * m[k] + (1 - b1) * gk
      v1 = b2 * v[k] + (1 - b2) * gk * gk
      p1 = p[k] - lr * (wd * p[k] + (m1 / (1 - b1**t)) / (np.sqrt(v1 / (1 - b2**t)) + eps))
      keep = (gk == 0) if skip else np.zeros(gk.shape, bool)
      p[k], m[k], v[k] = (np.where(keep, a, b) for a, b in ((p[k], p1), (m[k], m1),
                                                            (v[k], v1)))
  return p


def test_one_definition_of_the_math():
  """The kernel's pure-JAX path is the optimizer's reference; both use velvet_element."""
  from vesperjax.optim import velvet_update_reference
  assert vu.velvet_update_reference_jnp is velvet_update_reference
  assert vu.velvet_element is _optim_module().velvet_element


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


def _fsdp_mesh():
  """data=2 x fsdp=4 over the 8 simulated CPU devices, Auto axes (as sharding.make_mesh)."""
  assert len(jax.devices()) >= 8
  return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


# fsdp-style: weights split on one dimension, norms/scalars replicated, one over both axes
SHARDED = {"emb": ((512, 64), P(None, "fsdp")), "w": ((64, 192), P("fsdp")),
           "both": ((1024,), P(("data", "fsdp"))), "norm": ((64,), P()), "s": ((), P())}


def _sharded_tree(mesh, key):
  params = {k: jax.random.normal(jax.random.fold_in(key, i), s)
            for i, (k, (s, _)) in enumerate(SHARDED.items())}
  shardings = {k: jax.NamedSharding(mesh, spec) for k, (_, spec) in SHARDED.items()}
  return params, shardings


def test_sharded_fused_update_runs_per_shard(monkeypatch):
  """shardings=: the kernel sees each device's local shard and matches the reference."""
  mesh = _fsdp_mesh()
  key = jax.random.key(4)
  params, sh = _sharded_tree(mesh, key)
  total = sum(p.size for p in params.values())
  seen = []
  real = vu.velvet_update_flat
  monkeypatch.setattr(vu, "velvet_update_flat",
                      lambda p, *a, **k: seen.append(p.shape[0]) or real(p, *a, **k))
  put = lambda t: jax.device_put(t, sh)
  kern = jax.jit(lambda p, g, m, v, lr, b1, c: vu.velvet_update(
      p, g, m, v, lr=lr, b1=b1, count=c, skip_zero_grads=True, impl="pallas",
      interpret=True, block_size=8192, shardings=sh, **HP))
  ref = jax.jit(lambda p, g, m, v, lr, b1, c: vu.velvet_update_reference_jnp(
      p, g, m, v, lr=lr, b1=b1, count=c, skip_zero_grads=True, **HP))
  zeros = jax.tree.map(jnp.zeros_like, params)
  state_k = state_r = (put(params), put(zeros), put(zeros))
  for t in (1, 2):
    g = put(_grads(jax.random.fold_in(key, t), params, jnp.float32, zero_frac=0.2))
    args = (jnp.float32(1e-2 * t), jnp.float32(0.9 - 0.01 * t), jnp.int32(t))
    u, m, v = kern(state_k[0], g, state_k[1], state_k[2], *args)
    u0, m0, v0 = ref(state_r[0], g, state_r[1], state_r[2], *args)
    _close((u, m, v), (u0, m0, v0))
    for x in (u, m, v):
      assert {k: y.sharding.spec for k, y in x.items()} == {k: s.spec for k, s in sh.items()}
    state_k = (optax.apply_updates(state_k[0], u), m, v)
    state_r = (optax.apply_updates(state_r[0], u0), m0, v0)
  # one bucket of this device's elements: 512*64/4 + 64*192/4 + 1024/8 + 64 + 1, padded
  local = 512 * 64 // 4 + 64 * 192 // 4 + 1024 // 8 + 64 + 1
  assert seen and all(n == -(-(local + 1) // 8192) * 8192 for n in seen), (seen, total)


def test_sharded_one_device_mesh_keeps_whole_buckets(monkeypatch):
  mesh = jax.make_mesh((1,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])
  params = {"a": jnp.ones((300,)), "b": jnp.ones((7, 9))}
  sh = {"a": jax.NamedSharding(mesh, P("fsdp")), "b": jax.NamedSharding(mesh, P())}
  seen = []
  real = vu.velvet_update_flat
  monkeypatch.setattr(vu, "velvet_update_flat",
                      lambda p, *a, **k: seen.append(p.shape[0]) or real(p, *a, **k))
  z = jax.tree.map(jnp.zeros_like, params)
  kw = dict(lr=0.1, b1=0.9, count=1, impl="pallas", interpret=True, **HP)
  out = vu.velvet_update(params, params, z, z, shardings=sh, **kw)
  _close(out, vu.velvet_update(params, params, z, z, **kw))
  assert seen == [512, 512]


def test_sharded_through_velvet_with_decay_mask():
  """velvet(fused=True, shardings=...) with a weight-decay mask (two kernel calls, each
  on its subset of shardings) equals the unfused optimizer on the same mesh."""
  from vesperjax import kernels, optim
  mesh = _fsdp_mesh()
  key = jax.random.key(5)
  params, sh = _sharded_tree(mesh, key)
  mask = {k: k in ("emb", "w") for k in params}
  kw = dict(learning_rate=1e-2, weight_decay=0.1, vocab_size=256, mask=mask)
  fused = optim.velvet(fused=True, shardings=sh, **kw)
  plain = optim.velvet(**kw)
  p = jax.device_put(params, sh)
  outs = []
  kernels.set_default_impl("pallas")  # interpret mode on CPU
  try:
    for tx in (fused, plain):
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, loss=jnp.float32(3.0)))
      state, q = tx.init(p), p
      for t in (1, 2):
        g = jax.device_put(_grads(jax.random.fold_in(key, t), params, jnp.float32), sh)
        u, state = step(g, state, q)
        q = optax.apply_updates(q, u)
      outs.append((q, state[1].mu, state[1].nu))
  finally:
    kernels.set_default_impl(None)
  _close(outs[0], outs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("block_size,interpret,match", [
    (100, True, "power of two"), (64, True, ">= 128"), (True, True, "power of two"),
    (1 << 21, False, "2\\^20"),
])
def test_block_size_validation(block_size, interpret, match):
  params = {"a": jnp.ones((300,))}
  z = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=match):
    vu.velvet_update(params, params, z, z, lr=0.1, b1=0.9, count=1, impl="pallas",
                     interpret=interpret, block_size=block_size, **HP)
  flat = jnp.zeros((1 << 21,))
  with pytest.raises(ValueError, match=match):
    vu.velvet_update_flat(flat, flat, flat, flat, vu._scalars(0.1, 0.9, count=1, **HP),
                          block_size=block_size, interpret=interpret)


def test_buckets_cut_at_max_chunk(monkeypatch):
  """Small max_chunk: one kernel call per bucket of whole leaves, same numbers."""
  key = jax.random.key(6)
  params = _tree(key, SHAPES)
  g = _grads(jax.random.fold_in(key, 1), params, jnp.float32, zero_frac=0.3)
  m = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  seen = []
  real = vu.velvet_update_flat
  monkeypatch.setattr(vu, "velvet_update_flat",
                      lambda p, *a, **k: seen.append(p.shape[0]) or real(p, *a, **k))
  kw = dict(lr=jnp.float32(1e-2), b1=jnp.float32(0.9), count=jnp.int32(3),
            skip_zero_grads=True, **HP)
  out = vu.velvet_update(params, g, m, m, impl="pallas", interpret=True, max_chunk=2048,
                         **kw)
  _close(out, vu.velvet_update_reference_jnp(params, g, m, m, **kw))
  # leaves of 1961, 1001, 105, 1, 8256, 0, 17: [1961], [1001, 105, 1], [8256], [0, 17]
  assert seen == [2048, 2048, 16384, 128], seen


def test_shardings_must_be_named_shardings():
  params = {"a": jnp.ones((300,))}
  z = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(TypeError, match="NamedSharding"):
    vu.velvet_update(params, params, z, z, lr=0.1, b1=0.9, count=1, impl="pallas",
                     interpret=True, shardings={"a": P()}, **HP)


def test_block_size_large_ok_in_interpret_mode():
  params = {"a": jnp.ones((300,))}
  z = jax.tree.map(jnp.zeros_like, params)
  kw = dict(lr=0.1, b1=0.9, count=1, impl="pallas", **HP)
  out = vu.velvet_update(params, params, z, z, interpret=True, block_size=1 << 21, **kw)
  _close(out, vu.velvet_update(params, params, z, z, interpret=True, **kw))


# The Mosaic GPU kernel (_velvet_mosaic.py) in Mosaic GPU's CPU interpreter: the same
# program as compiled (TMA copies, barriers, shared memory simulated).

@pytest.mark.parametrize("skip", [False, True])
def test_mosaic_matches_reference(skip):
  key = jax.random.key(7)
  params = _tree(key, SHAPES)
  kern = lambda *a, **k: vu.velvet_update(*a, impl="mosaic", interpret=True, **k)
  zf = 0.3 if skip else 0
  p1, tr1, step = _run(kern, params, 4, key, jnp.float32, skip, zero_frac=zf)
  p0, tr0, _ = _run(_optim_reference(), params, 4, key, jnp.float32, skip, zero_frac=zf)
  _close(p1, p0)
  for a, b in zip(tr1, tr0):
    _close(a, b)
  assert step._cache_size() == 1


def test_mosaic_blocks_and_zero_second_moment(monkeypatch):
  """Several 128-wide blocks per bucket; v = 0 entries (sqrt through rsqrt) stay finite."""
  seen = []
  from vesperjax.kernels import _velvet_mosaic as vm
  real = vm.velvet_update_flat
  monkeypatch.setattr(vm, "velvet_update_flat",
                      lambda p, *a, **k: seen.append((p.shape[0], k["block_size"]))
                      or real(p, *a, **k))
  params = {"a": jnp.linspace(-1, 1, 1500).reshape(30, 50), "b": jnp.ones((7,))}
  g = {"a": jnp.zeros((30, 50)).at[::2].set(0.5), "b": jnp.full((7,), -2.0)}
  m = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  v = jax.tree.map(jnp.zeros_like, params)
  kw = dict(lr=jnp.float32(1e-2), b1=jnp.float32(0.9), count=jnp.int32(1), **HP)
  out = jax.block_until_ready(jax.jit(lambda *a: vu.velvet_update(  # see _run
      *a, impl="mosaic", interpret=True, block_size=256, **kw))(params, g, m, v))
  ref = vu.velvet_update_reference_jnp(params, g, m, v, **kw)
  assert seen == [(1536, 256)]  # 1500 + 7 + 1 link element, in 256-element blocks
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))
  _close(out, ref)


def test_kernel_choice(monkeypatch):
  """impl names a kernel; "pallas" takes the first of platform.CHOICES["velvet_kernel"]
  that applies (Triton while jax ships it; Mosaic GPU on sm_90+)."""
  assert vu.choose_kernel("mosaic", True) == ("mosaic", True)
  assert vu.choose_kernel("triton", True) == ("triton", True)
  assert vu.choose_kernel("reference") == (None, False)
  assert vu.choose_kernel("auto") == (None, False)  # CPU target: the pure-JAX path
  assert vu.choose_kernel("pallas", True) == ("triton", True)
  monkeypatch.setattr(vu, "kernel_applies", lambda k: k == "mosaic")  # no Triton
  assert vu.choose_kernel("pallas", True) == ("mosaic", True)
  monkeypatch.setattr(vu, "kernel_applies", lambda k: False)
  with pytest.raises(ValueError, match="impl='reference'"):
    vu.choose_kernel("pallas", True)
  with pytest.raises(ValueError, match="impl must be one of"):
    vu.choose_kernel("cuda", True)


def test_mosaic_needs_sm90(monkeypatch):
  class Device:
    platform = "gpu"
    def __init__(self, cc):
      self.compute_capability = cc
  for cc, ok in (("8.0", False), ("8.6", False), ("9.0", True), ("10.0", True)):
    monkeypatch.setattr(jax, "devices", lambda cc=cc: [Device(cc)])
    assert vu.kernel_applies("mosaic") is ok
    if not ok:  # asked for by name, compiled: one clear line, not a device-side failure
      with pytest.raises(ValueError, match="compute capability 9.0"):
        vu.choose_kernel("mosaic", False)


@pytest.mark.parametrize("block_size,match", [(1 << 16, "256 rows"), (100, "power of two"),
                                              (64, ">= 128")])
def test_mosaic_block_size_validation(block_size, match):
  params = {"a": jnp.ones((300,))}
  z = jax.tree.map(jnp.zeros_like, params)
  with pytest.raises(ValueError, match=match):
    vu.velvet_update(params, params, z, z, lr=0.1, b1=0.9, count=1, impl="mosaic",
                     interpret=False, block_size=block_size, **HP)


@pytest.mark.parametrize("kernel", ["triton", "mosaic", "tpu"])
def test_velvet_fused_names_its_kernel(kernel):
  """velvet(fused="triton" | "mosaic" | "tpu") (config optim.fused_kernel) runs that kernel,
  interpreted on CPU, and equals the unfused optimizer."""
  from vesperjax import optim
  key = jax.random.key(11)
  params = _tree(key, SHAPES)
  kw = dict(learning_rate=1e-2, weight_decay=0.1, vocab_size=256)
  outs = []
  for tx in (optim.velvet(fused=kernel, **kw), optim.velvet(**kw)):
    step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, loss=jnp.float32(3.0)))
    state, q = tx.init(params), params
    for t in (1, 2):
      g = _grads(jax.random.fold_in(key, t), params, jnp.float32)
      u, state = jax.block_until_ready(step(g, state, q))  # see _run: interpreter waits
      q = optax.apply_updates(q, u)
    outs.append((q, state[1].mu, state[1].nu))
  _close(outs[0], outs[1], rtol=1e-5, atol=1e-7)


def test_velvet_fused_rejects_an_unknown_kernel():
  from vesperjax import optim
  with pytest.raises(ValueError, match="fused='cuda'"):
    optim.velvet(fused="cuda", vocab_size=256)
