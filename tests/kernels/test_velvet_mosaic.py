"""The Mosaic GPU Velvet kernel lowered for CUDA from this host (no GPU needed).

Mosaic GPU modules are compiled on the device at run time, so lowering is what a CPU
host can check: the kernel traces, passes Mosaic GPU's lowering (TMA block limits,
supported primitives) and lands in the module as its custom call; the numbers are
checked in Mosaic GPU's interpreter (tests/kernels/test_velvet_update.py).
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tests import gpu_util
from vesperjax.kernels import _velvet_update as vu
from vesperjax.kernels import platform

MOSAIC = "mosaic_gpu_v2"
TRITON = "__gpu$xla.gpu.triton"
HP = dict(b2=0.999, eps=1e-8, weight_decay=1e-3)
SHAPES = {"w": (64, 192), "emb": (300, 64), "norm": (64,)}


def _abstract():
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in SHAPES.items()}


def _step(impl, skip=False, shardings=None):
  return jax.jit(lambda p, g, m, v, lr, c: vu.velvet_update(
      p, g, m, v, lr=lr, b1=0.9, count=c, skip_zero_grads=skip, impl=impl,
      shardings=shardings, **HP))


def _lowered_calls(impl, skip=False, shardings=None, abstract=None):
  a = abstract or _abstract()
  args = (a, a, a, a, jax.ShapeDtypeStruct((), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.int32))
  with platform.use("cuda"):
    text = gpu_util.lowered_for_cuda(_step(impl, skip, shardings), *args)
  return gpu_util.custom_calls(text), text


def test_mosaic_kernel_lowers_for_cuda():
  for skip in (False, True):
    calls, _ = _lowered_calls("mosaic", skip)
    # one bucket (all leaves fit MAX_CHUNK): one Mosaic GPU kernel, no Triton
    assert calls[MOSAIC] == 1 and calls[TRITON] == 0, calls


def test_mosaic_buckets_within_tma_limits():
  """A leaf past max_chunk gets its own bucket; every call's block stays within TMA's 256
  rows (lowering refuses more), and the bucket is viewed as [rows, 128]."""
  a = {"big": jax.ShapeDtypeStruct((vu.MAX_CHUNK + 5,), jnp.float32), **_abstract()}
  calls, text = _lowered_calls("mosaic", abstract=a)
  assert calls[MOSAIC] == 2, calls
  rows = -(-(vu.MAX_CHUNK + 5 + 1) // 4096) * 4096 // 128
  assert f"tensor<{rows}x128xf32>" in text


def test_auto_on_cuda_takes_the_table_choice():
  """impl="auto" for a CUDA target runs the first kernel of platform.CHOICES that
  applies: Triton while jax ships it."""
  first = platform.CHOICES["velvet_kernel"]["*"][0]
  calls, _ = _lowered_calls("auto")
  assert calls[{"triton": TRITON, "mosaic": MOSAIC}[first]] == 1, calls


def test_mosaic_per_shard_under_shard_map():
  """shardings=: the Mosaic kernel runs per shard (each call on the local bucket)."""
  n = len(jax.devices())
  mesh = jax.make_mesh((n,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  specs = {"w": P("fsdp"), "emb": P(None, "fsdp"), "norm": P()}
  sh = {k: jax.NamedSharding(mesh, s) for k, s in specs.items()}
  a = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh[k]) for k, s in SHAPES.items()}
  calls, text = _lowered_calls("mosaic", shardings=sh, abstract=a)
  assert calls[MOSAIC] == 1, calls
  local = 64 * 192 // n + 300 * 64 // n + 64
  rows = -(-(local + 1) // 4096) * 4096 // 128
  assert f"tensor<{rows}x128xf32>" in text
