"""The Pallas Mosaic TPU Velvet kernel: numbers in Pallas's TPU interpret mode on CPU
against the pure-JAX reference, and deviceless libtpu compiles for v5e and v5p (they
skip, saying why, without libtpu)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import tpu_util
from vesperjax.kernels import _velvet_tpu as vt
from vesperjax.kernels import _velvet_update as vu
from vesperjax.kernels import platform
from vesperjax.optim.velvet import velvet

HP = dict(b2=0.999, eps=1e-8, weight_decay=1e-3)
SHAPES = [(37, 53), (1001,), (3, 5, 7), (1,), (0,), (64, 129)]


def _leaves(key, shapes, zero_frac=0.0):
  out = {}
  for i, s in enumerate(shapes):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    x = jax.random.normal(k1, s, jnp.float32)
    if zero_frac:
      x = jnp.where(jax.random.uniform(k2, s) < zero_frac, 0.0, x)
    out[f"w{i}"] = x
  return out


def _trajectory(fn, steps, skip, bc1):
  """`steps` updates of `fn` (a velvet_update) from zero moments, params moved by each."""
  params = _leaves(jax.random.key(0), SHAPES)
  mu = jax.tree.map(jnp.zeros_like, params)
  nu = jax.tree.map(jnp.zeros_like, params)
  step = jax.jit(lambda p, g, m, v, lr, b1, c, bc: fn(
      p, g, m, v, lr=lr, b1=b1, count=c, skip_zero_grads=skip,
      bc1=bc if bc1 else None, **HP))
  out = []
  for t in range(1, steps + 1):
    g = _leaves(jax.random.key(t), SHAPES, zero_frac=0.3 if skip else 0.0)
    b1 = jnp.float32(0.9 - 0.02 * (t % 3))  # changes each step, as Velvet's b1_t
    # blocking: the TPU interpreter runs JAX ops in host callbacks, which wait behind
    # any work dispatched meanwhile (CPU runs programs in order): a deadlock
    u, mu, nu = jax.block_until_ready(step(params, g, mu, nu, jnp.float32(1e-2 / t), b1,
                                           jnp.int32(t), jnp.float32(1 - 0.88 ** t)))
    params = jax.tree.map(jnp.add, params, u)
    out.append((u, mu, nu))
  return out


def _close(a, b, rtol=2e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# the default tier runs two corners of each grid (interpret mode costs seconds a case)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("skip,bc1", [
    (False, False), (True, True), pytest.param(True, False, marks=SLOW),
    pytest.param(False, True, marks=SLOW)],
    ids=["dense-step_bc", "sparse-product_bc", "sparse-step_bc", "dense-product_bc"])
def test_tpu_kernel_matches_reference_in_interpret_mode(skip, bc1):
  kern = lambda *a, **k: vu.velvet_update(*a, impl="tpu", interpret=True, **k)
  got = _trajectory(kern, 3, skip, bc1)
  want = _trajectory(vu.velvet_update_reference_jnp, 3, skip, bc1)
  for a, b in zip(got, want):
    _close(a, b)


def _optimizer_run(rules, sparse, fused):
  """Velvet's whole transformation (clipping, its rules, the step) for 3 steps with a
  changing loss and entropy: the rule sets differ only in what reaches the kernel."""
  tx = velvet(1e-2, vocab_size=2048, rules=rules, sparse_aware=sparse, fused=fused)
  params = _leaves(jax.random.key(1), SHAPES[:4])
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads, loss, entropy):
    updates, state = tx.update(grads, state, params, loss=loss, entropy=entropy)
    return jax.tree.map(jnp.add, params, updates), state

  for t in range(1, 4):
    grads = _leaves(jax.random.key(10 + t), SHAPES[:4], zero_frac=0.3)
    params, state = jax.block_until_ready(  # see _trajectory
        step(params, state, grads, jnp.float32(6.0 / t), jnp.float32(3.0 + t)))
  return params, state, step.trace(params, state, grads, jnp.float32(1), jnp.float32(1))


@pytest.mark.parametrize("rules,sparse", [
    ("original", False), ("corrected", True), pytest.param("original", True, marks=SLOW),
    pytest.param("corrected", False, marks=SLOW)],
    ids=["original-dense", "corrected-sparse", "original-sparse", "corrected-dense"])
def test_velvet_fused_on_tpu_equals_unfused(rules, sparse):
  """fused=True traced for a TPU target runs the Mosaic TPU kernel (auto: the table's
  velvet_kernel row), here in the TPU interpreter, and equals the unfused optimizer."""
  with platform.use("tpu"), pltpu.force_tpu_interpret_mode():
    fused = _optimizer_run(rules, sparse, fused=True)
  plain = _optimizer_run(rules, sparse, fused=False)
  assert "velvet_update_tpu" in str(fused[2].jaxpr)  # the kernel ran, not the reference
  assert "velvet_update_tpu" not in str(plain[2].jaxpr)
  # the kernel's scalars are fp32 (1 - b2 too), optax's unfused step takes 1 - b2 in
  # float64: ~1e-5 relative apart in v's increment, ~1e-6 absolute in 3 steps of 1e-2
  _close(fused[:2], plain[:2], rtol=1e-5, atol=1e-6)


def test_auto_runs_the_tpu_kernel_only_for_a_tpu_target():
  with platform.use("tpu"):
    assert vu.choose_kernel("auto") == ("tpu", False)  # compiled by libtpu
    assert vu.choose_kernel("reference") == (None, False)
  with platform.use("cpu"):
    assert vu.choose_kernel("auto") == (None, False)
    assert vu.choose_kernel("tpu") == ("tpu", True)  # interpreted off TPU
  with platform.use("cuda"):
    assert vu.choose_kernel("auto")[0] in ("triton", "mosaic")


def test_block_sizes_are_whole_fp32_tiles():
  with pytest.raises(ValueError, match="power of two >= 1024"):
    vt.check_block_size(512, compiled=False)  # less than one (8, 128) tile
  with pytest.raises(ValueError, match="VMEM"):
    vt.check_block_size(vt.MAX_BLOCK_SIZE * 2, compiled=True)
  vt.check_block_size(vt.MAX_BLOCK_SIZE * 2, compiled=False)  # interpret mode: no VMEM
  assert vt.default_block_size(5, interpret=False) == vt.MIN_BLOCK_SIZE
  assert vt.default_block_size(10 ** 7, interpret=False) == vt.DEFAULT_BLOCK_SIZE
  # double-buffered blocks of the default fit v5e's 16 MiB default scoped VMEM
  assert vt.vmem_bytes(vt.DEFAULT_BLOCK_SIZE) < 16 << 20


def _compile(topology, shapes, *, count=None, block_size=None, specs=None, skip=True):
  devs = tpu_util.devices(topology)[:count]
  mesh = jax.sharding.Mesh(np.array(devs), ("fsdp",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  specs = specs or {k: P() for k in shapes}
  sh = {k: NamedSharding(mesh, specs[k]) for k in shapes}
  a = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh[k]) for k, s in shapes.items()}
  scalar = lambda dt: jax.ShapeDtypeStruct((), dt, sharding=NamedSharding(mesh, P()))
  fn = jax.jit(lambda p, g, m, v, lr, c: vu.velvet_update(
      p, g, m, v, lr=lr, b1=0.9, count=c, skip_zero_grads=skip, impl="auto",
      block_size=block_size, shardings=sh if len(devs) > 1 else None, **HP),
      donate_argnums=(2, 3))
  with platform.use("tpu"):
    return tpu_util.compile_for_tpu(fn, a, a, a, a, scalar(jnp.float32), scalar(jnp.int32))


@tpu_util.needs_tpu_compile
@pytest.mark.parametrize("topology", [
    "v5e:2x2", "v5p:2x2x1",
    pytest.param("v4:2x2x1", marks=pytest.mark.slow),  # 16 MiB of VMEM: the tightest
    pytest.param("v6e:2x4", marks=pytest.mark.slow)])
def test_kernel_compiles_for_tpu(topology):
  """libtpu compiles the kernel itself (layouts, VMEM, block shapes): one Mosaic call
  per bucket, a leaf past max_chunk in a bucket of its own, the largest block too."""
  shapes = {"big": (vu.MAX_CHUNK + 5,), "w": (300, 64), "norm": (64,)}
  text = _compile(topology, shapes, count=1).as_text()
  assert tpu_util.custom_calls(text)[tpu_util.MOSAIC] == 2
  rows = -(-(vu.MAX_CHUNK + 5 + 1) // vt.DEFAULT_BLOCK_SIZE) * vt.DEFAULT_BLOCK_SIZE // 128
  assert f"f32[{rows},128]" in text  # the big bucket, viewed as [rows, 128]
  big = _compile(topology, {"w": (4096, 512)}, count=1, block_size=vt.MAX_BLOCK_SIZE)
  assert tpu_util.custom_calls(big.as_text())[tpu_util.MOSAIC] == 1


@tpu_util.needs_tpu_compile
def test_kernel_runs_per_shard_on_a_v5e_slice():
  """shardings=: each chip packs and updates its own shards (the kernel sees the local
  bucket, never a gathered one)."""
  shapes = {"w": (256, 512), "emb": (512, 256), "norm": (256,)}
  specs = {"w": P("fsdp"), "emb": P(None, "fsdp"), "norm": P()}
  text = _compile("v5e:2x2", shapes, specs=specs).as_text()
  assert tpu_util.custom_calls(text)[tpu_util.MOSAIC] == 1
  local = 256 * 512 // 4 + 512 * 256 // 4 + 256
  rows = -(-(local + 1) // vt.DEFAULT_BLOCK_SIZE) * vt.DEFAULT_BLOCK_SIZE // 128
  assert f"f32[{rows},128]" in text
  assert "all-gather" not in text
