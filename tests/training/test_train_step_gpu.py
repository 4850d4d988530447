"""The real train and eval steps built for CUDA on this CPU host: the GPU graph, not the CPU one.

Lowering tests run anywhere (StableHLO lowered for cuda from the CPU devices); compile
tests run XLA:GPU itself for H100-80GB and H200 targets on 1 and 8 compile-only devices
(they skip, saying why, without the CUDA plugin wheels).
"""

import jax
import jax.numpy as jnp
import pytest

from tests import gpu_util
from tests.abstract_steps import abstract_steps, small_run
from vesperjax import kernels, sharding
from vesperjax.planning import gpu_targets


def _lowered(run, devices):
  mesh, steps, batch, tokens = abstract_steps(run, devices)
  with jax.set_mesh(mesh):
    train = gpu_util.lowered_for_cuda(steps.train_step, steps.abstract, batch)
    evaluate = gpu_util.lowered_for_cuda(steps.eval_step, steps.abstract, tokens)
  return train, evaluate


CUDNN = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
TRITON = "__gpu$xla.gpu.triton"


# On a multi-device mesh jax wraps cuDNN attention in a custom partitioning call that
# becomes the cuDNN call when XLA partitions the program (the compile tests see it).
PARTITIONED = "CustomSPMDPartitioning"


def _assert_gpu_graph(text, *, training=True, partitioned=False):
  calls = gpu_util.custom_calls(text)
  if partitioned:
    assert calls[PARTITIONED] >= (2 if training else 1), calls
  else:
    assert calls[CUDNN[0]] >= 1, calls
    if training:
      assert calls[CUDNN[1]] >= 1, calls
  assert "optimization_barrier" not in text  # the CPU-only weight-gradient transpose
  assert "xbf16>" in text  # auto compute dtype: bf16 on an accelerator


def test_dense_step_lowers_to_the_gpu_graph():
  train, evaluate = _lowered(small_run(), jax.devices()[:1])
  _assert_gpu_graph(train)
  _assert_gpu_graph(evaluate, training=False)
  assert TRITON not in gpu_util.custom_calls(train)  # nothing asked for Pallas


def test_same_step_for_cpu_keeps_the_cpu_graph():
  """The control: the same run for the cpu platform has none of the GPU choices."""
  mesh, steps, batch, _ = abstract_steps(small_run(platform="cpu"), jax.devices()[:1])
  with jax.set_mesh(mesh):
    text = steps.train_step.trace(steps.abstract, batch).lower().as_text()
  assert not set(CUDNN) & set(gpu_util.custom_calls(text))
  assert "optimization_barrier" in text and "xbf16>" not in text


def test_platform_from_environment(monkeypatch):
  monkeypatch.setenv("VESPERJAX_PLATFORM", "cuda")
  _, steps, _, _ = abstract_steps(small_run(platform="auto"), jax.devices()[:1])
  assert steps.platform == "cuda"
  monkeypatch.delenv("VESPERJAX_PLATFORM")
  _, steps, _, _ = abstract_steps(small_run(platform="auto"), jax.devices()[:1])
  assert steps.platform == "cpu"  # the mesh's devices


def test_moe_step_lowers_a_grouped_gemm_on_gpu():
  # auto on CUDA is tokamax, whose path traced off a GPU (no cross-compile) is XLA's
  # ragged_dot: a grouped GEMM, not the CPU's padded row blocks. Its Mosaic and Triton
  # kernels are compiled in tests/kernels/test_grouped_matmul_gpu.py.
  train, _ = _lowered(small_run("tiny-moe"), jax.devices()[:1])
  _assert_gpu_graph(train)
  assert "ragged_dot" in train


def test_pallas_everywhere_lowers_to_triton():
  kernels.set_default_impl("pallas")
  try:
    train, _ = _lowered(small_run("tiny-moe", optim__fused=True), jax.devices()[:1])
  finally:
    kernels.set_default_impl(None)
  calls = gpu_util.custom_calls(train)
  # attention forward + its backward kernels, the CE forward, the fused Velvet update
  assert calls[TRITON] >= 4, calls
  assert not set(CUDNN) & set(calls)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(data=2, expert=4)],
                         ids=["fsdp", "expert"])
def test_eight_device_meshes_lower_for_gpu(mesh):
  overrides = {f"mesh__{k}": v for k, v in mesh.items()}
  train, _ = _lowered(small_run("tiny-moe", optim__fused=True, **overrides), jax.devices()[:8])
  _assert_gpu_graph(train, partitioned=True)
  assert TRITON in gpu_util.custom_calls(train)
  if "expert" in mesh:
    assert "all_to_all" in train  # expert-parallel dispatch


def _compiled(target, count, run):
  mesh, steps, batch, _ = abstract_steps(run, gpu_util.target_devices(target, count))
  with jax.set_mesh(mesh):
    return gpu_util.compile_for(target, steps.train_step, steps.abstract, batch)


@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("target,count,preset,mesh", [
    ("h100-80gb", 1, "tiny", {}),
    ("h200", 1, "tiny-moe", {}),
    # slow: tests/kernels/test_grouped_matmul_gpu.py compiles the same expert-parallel
    # step with its kernels
    pytest.param("h100-80gb", 8, "tiny-moe", dict(data=2, expert=4), marks=pytest.mark.slow),
    ("h200", 8, "tiny", dict(data=2, fsdp=4)),
])
def test_train_step_compiles_for_gpu_targets(target, count, preset, mesh):
  overrides = {f"mesh__{k}": v for k, v in mesh.items()}
  compiled = _compiled(target, count, small_run(preset, platform="auto", **overrides))
  text = compiled.as_text()
  calls = gpu_util.custom_calls(text)
  assert calls[CUDNN[0]] >= 1 and calls[CUDNN[1]] >= 1, calls
  m = compiled.memory_analysis()
  assert 0 < m.argument_size_in_bytes and 0 < m.temp_size_in_bytes
  assert m.argument_size_in_bytes + m.temp_size_in_bytes < gpu_targets.device_memory_bytes(target)
  kinds = {c["kind"] for c in sharding.hlo_collectives(text)}
  assert bool(kinds) == (count > 1), kinds
  if "expert" in mesh:
    assert "all-to-all" in kinds


@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_remat_saves_memory_on_gpu(scan_layers):
  """remat='full' keeps only each layer's input for the backward, scanned or unrolled
  (unrolled layers need prevent_cse, or XLA merges the recomputation away). XLA:CPU's
  buffer assignment does not show this, so it is checked on the H100 target."""
  import numpy as np
  from flax import nnx
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  import vesperjax as vj
  from vesperjax.kernels import platform
  on_gpu = NamedSharding(Mesh(np.array(gpu_util.target_devices("h100-80gb")), ("x",)), P())
  tokens = jax.ShapeDtypeStruct((32, 64), jnp.int32, sharding=on_gpu)

  def temp_bytes(remat):
    config = vj.model_preset("tiny", vocab_size=256, num_layers=4, max_seq_len=64,
                             remat=remat, scan_layers=scan_layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: vj.VesperLM(config, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_gpu),
                          params)

    def loss(p, x):
      with platform.use("cuda"):
        return nnx.merge(graphdef, p)(x)[0].mean()

    compiled = gpu_util.compile_for("h100-80gb", jax.jit(jax.grad(loss)), params, tokens)
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes("full") < 0.75 * temp_bytes("none")  # unfixed, unrolled: equal
