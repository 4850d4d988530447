"""The MoE grouped-matmul choices compiled by XLA:GPU for H100 on this CPU host.

tokamax decides which kernel to run from the default device when tracing, so on a host
without a GPU it takes its XLA path. `tokamax_kernels_for` makes it trace its GPU kernels
for a compile-only target device instead (tokamax's `cross_compile` plus that device as
the default one): the Pallas Triton kernel is then compiled to a cubin by XLA:GPU, and
the Mosaic GPU kernel (a `mosaic_gpu_v2` custom call compiled on the device at run time)
is checked as far as a deviceless compile goes.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import gpu_util
from tests.abstract_steps import abstract_steps, small_run
from vesperjax.planning import gpu_targets
from vesperjax.kernels import grouped_matmul, platform
from vesperjax.kernels._grouped_matmul import tokamax_ragged_dot

TRITON = "__gpu$xla.gpu.triton"
MOSAIC = "mosaic_gpu_v2"
TARGET = "h100-80gb"


@contextlib.contextmanager
def tokamax_kernels_for(device):
  """Trace tokamax's GPU kernels for `device` (a compile-only GPU device)."""
  from tokamax import config  # pylint: disable=g-import-not-at-top
  with config.cross_compile(True), jax.default_device(device):
    yield


def _abstract(devices, *shapes_dtypes):
  on = NamedSharding(Mesh(np.array(devices), ("x",)), P())
  return [jax.ShapeDtypeStruct(s, d, sharding=on) for s, d in shapes_dtypes]


def _grouped_fwd_bwd(matmul):
  def loss(x, w, sizes):
    return jnp.sum(matmul(x, w, sizes).astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, (0, 1)))


@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("impl,kernel", [
    ("ragged_dot", None), ("triton", TRITON), ("mosaic_gpu", MOSAIC)])
def test_grouped_matmul_forward_and_backward_compile_for_h100(impl, kernel):
  devices = gpu_util.target_devices(TARGET)
  args = _abstract(devices, ((512, 256), jnp.bfloat16), ((4, 256, 512), jnp.bfloat16),
                   ((4,), jnp.int32))
  if impl == "ragged_dot":
    with platform.use("cuda"):
      fn = _grouped_fwd_bwd(lambda x, w, s: grouped_matmul(x, w, s, impl="ragged_dot"))
      compiled = gpu_util.compile_for(TARGET, fn, *args)
    assert "ragged_dot" in str(fn.trace(*args).jaxpr)
  else:
    fn = _grouped_fwd_bwd(lambda x, w, s: tokamax_ragged_dot(x, w, s, implementation=impl))
    with tokamax_kernels_for(devices[0]):
      compiled = gpu_util.compile_for(TARGET, fn, *args)
  calls = gpu_util.custom_calls(compiled.as_text())
  if kernel:
    assert calls[kernel] >= 3, calls  # forward, dx and dw kernels
  else:
    assert not calls, calls  # XLA's own grouped matmul, no kernel
  assert compiled.memory_analysis().argument_size_in_bytes > 0


def test_tokamax_without_a_gpu_takes_its_xla_path_for_cuda():
  """Traced for CUDA on a CPU host (no cross-compile), auto falls through tokamax's
  kernels to its XLA path: the lowered graph still has a grouped matmul, no kernel."""
  x, w = jnp.ones((64, 16), jnp.bfloat16), jnp.ones((4, 16, 32), jnp.bfloat16)
  sizes = jnp.asarray([10, 0, 30, 20], jnp.int32)
  with platform.use("cuda"):
    fn = _grouped_fwd_bwd(lambda x, w, s: grouped_matmul(x, w, s, impl="auto"))
    assert "ragged_dot" in str(fn.trace(x, w, sizes).jaxpr)
    text = gpu_util.lowered_for_cuda(fn, x, w, sizes)
  calls = gpu_util.custom_calls(text)
  assert TRITON not in calls and MOSAIC not in calls, calls


@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("moe_matmul,count,mesh,kernel", [
    # slow: tests/training/test_train_step_gpu.py compiles auto's tokamax XLA path,
    # which is ragged_dot
    pytest.param("ragged_dot", 1, {}, None, marks=pytest.mark.slow),
    # slow: auto's CUDA choice only without tokamax, which the test extra installs
    pytest.param("blocked", 1, {}, None, marks=pytest.mark.slow),
    # slow: the expert-parallel step below compiles the same kernels
    pytest.param("tokamax", 1, {}, MOSAIC, marks=pytest.mark.slow),
    ("tokamax", 8, dict(data=2, expert=4), MOSAIC),
], ids=["ragged_dot", "blocked", "tokamax", "tokamax-expert-parallel"])
def test_moe_train_step_compiles_for_h100_with_each_choice(moe_matmul, count, mesh, kernel):
  overrides = {f"mesh__{k}": v for k, v in mesh.items()}
  run = small_run("tiny-moe", model__moe_matmul=moe_matmul, **overrides)
  devices = gpu_util.target_devices(TARGET, count)
  mesh_, steps, batch, _ = abstract_steps(run, devices)
  context = tokamax_kernels_for(devices[0]) if kernel else contextlib.nullcontext()
  with jax.set_mesh(mesh_), context, gpu_targets.deviceless(TARGET):
    traced = steps.train_step.trace(steps.abstract, batch)
    jaxpr, compiled = str(traced.jaxpr), traced.lower().compile()
  text = compiled.as_text()
  calls = gpu_util.custom_calls(text)
  if not kernel:  # XLA's ragged dot or the padded row blocks, as asked
    assert ("ragged_dot_general" in jaxpr) == (moe_matmul == "ragged_dot")
  else:
    # the scanned layer's 3 expert matmuls (gate, up, down), each forward, dx and dw
    assert calls[kernel] >= 9, calls
  if mesh:
    assert "all-to-all" in text
  m = compiled.memory_analysis()
  assert 0 < m.argument_size_in_bytes and 0 < m.temp_size_in_bytes
