"""The Pallas kernels traced and compiled for H100/H200 (and A100) from this CPU host.

Lowering tests run anywhere (the Triton IR Pallas embeds in the lowered program); compile
tests run XLA:GPU itself, Triton -> PTX -> cubin, for a compile-only target and skip,
saying why, without the CUDA plugin wheels. Shapes are small: each compile takes seconds.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import gpu_util
from vesperjax.planning import gpu_targets
from vesperjax.kernels import _attention as att
from vesperjax.kernels import _cross_entropy as ce
from vesperjax.kernels import _era as era_mod
from vesperjax.kernels import platform

TRITON = "__gpu$xla.gpu.triton"
HIGHEST = jax.lax.Precision.HIGHEST


def _on(devices, *specs):
  """ShapeDtypeStructs (shape, dtype) replicated on compile-only `devices`."""
  sharding = NamedSharding(Mesh(np.array(devices), ("x",)), P())
  return [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in specs]


def _compile(target, fn, *specs):
  with platform.use("cuda"):
    return gpu_util.compile_for(target, jax.jit(fn),
                                *_on(gpu_util.target_devices(target), *specs))


def _triton_ir(fn, *args):
  """Triton IR text of every Pallas kernel of `fn` lowered for CUDA.

  jaxlib <= 0.10.2 embeds each kernel's Triton module as MLIR bytecode in the
  `__gpu$xla.gpu.triton` call's backend_config (field "ir"); it is parsed back here with
  the Triton dialect registered. Newer jaxlibs compile it at lowering: the test skips.
  """
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import lowering  # pylint: disable=g-import-not-at-top
  with platform.use("cuda"):
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
  blobs = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          attrs = child.operation.attributes
          if (child.operation.name == "stablehlo.custom_call"
              and ir.StringAttr(attrs["call_target_name"]).value == TRITON):
            config = ir.DictAttr(attrs["mhlo.backend_config"])
            blobs.append(ir.StringAttr(config["ir"]).value_bytes)
          walk(child.operation)

  walk(module.operation)
  if not blobs:
    pytest.skip(f"this jaxlib embeds no Triton IR in {TRITON} calls")
  context = lowering._new_ir_context()  # pylint: disable=protected-access
  return [str(ir.Module.parse(blob, context=context)) for blob in blobs]


# ------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize("precision,tf32", [(None, True), (HIGHEST, False)])
def test_ce_pallas_forward_dot_follows_precision(precision, tf32):
  """fp32 HIGHEST must not run the logits matmul on TF32 tensor cores; the default may."""
  h, w = jax.ShapeDtypeStruct((128, 64), jnp.float32), jax.ShapeDtypeStruct((256, 64),
                                                                            jnp.float32)
  labels = jax.ShapeDtypeStruct((128,), jnp.int32)
  fn = lambda h, w, l: ce.linear_cross_entropy(h, w, l, impl="pallas", interpret=False,
                                               precision=precision)
  dots = [line for text in _triton_ir(fn, h, w, labels) for line in text.splitlines()
          if "tt.dot" in line]
  assert dots
  assert all(("inputPrecision = tf32" in line) == tf32 for line in dots), dots


@gpu_util.needs_gpu_compile
def test_ce_pallas_forward_compiles_at_a_real_shape():
  """N=4096, V=32768, D=2048 bf16: w (2^26 elements) is one BlockSpec block, but the
  kernel only loads [block_vocab, 64] tiles of it, under Triton's 2^20-element limit."""
  n, v, d = 4096, 32768, 2048
  fn = lambda h, w, l: ce.linear_cross_entropy(h, w, l, impl="pallas", interpret=False)
  compiled = _compile("h100-80gb", fn, ((n, d), jnp.bfloat16), ((v, d), jnp.bfloat16),
                      ((n,), jnp.int32))
  assert gpu_util.custom_calls(compiled.as_text())[TRITON] == 1


@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("target", ["h100-80gb", "a100-80gb"])
@pytest.mark.parametrize("bn,bv,d,dtype", [(64, 128, 2048, jnp.bfloat16),
                                           (128, 256, 2048, jnp.float32),
                                           (16, 128, 32, jnp.bfloat16)])
def test_ce_smem_estimate_bounds_the_compiled_kernel(target, bn, bv, d, dtype):
  fn = lambda h, w, l: ce.linear_cross_entropy(h, w, l, impl="pallas", interpret=False,
                                               block_tokens=bn, block_vocab=bv)
  with platform.use("cuda"):
    got = _requested_smem(fn, ((1024, d), dtype), ((4096, d), dtype), ((1024,), jnp.int32),
                          target=target)
  assert got <= ce.pallas_smem_bytes(bn, bv, d, dtype)


# ------------------------------------------------------------------ attention

needs_tokamax = pytest.mark.skipif(not att.tokamax_available(),
                                   reason="tokamax not installed (the gpu extra)")
MOSAIC = "mosaic_gpu_v2"


def _tokamax_grad(order=att.TOKAMAX_ORDER):
  """d(sum(attention))/d(q, k, v) through tokamax trying `order`."""
  loss = lambda q, k, v: jnp.sum(att.attention(
      q, k, v, True, "tokamax", tokamax_order=order).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


@pytest.fixture
def hopper_host(monkeypatch):
  """tokamax's Mosaic GPU attention as on an sm_90 device: it reads the compute
  capability of the host's default device (none here); returns that op to pass in
  `tokamax_order` (the name "mosaic" also follows the host's device, to Mosaic TPU)."""
  from tokamax._src import gpu_utils  # pylint: disable=g-import-not-at-top
  from tokamax._src.ops.attention import api  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gpu_utils, "_compute_capability", lambda device=None: 9.0)
  return api.IMPLEMENTATIONS["mosaic_gpu"]


@needs_tokamax
def test_attention_tokamax_lowers_its_triton_kernels_for_cuda():
  """On this GPU-less host tokamax's Mosaic kernel declines (no sm_90 device) and its
  Triton flash forward and backward lower; the same call traced for the CPU takes
  tokamax's XLA path again (its hardware checks are back on)."""
  spec = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  with platform.use("cuda"):
    calls = gpu_util.custom_calls(gpu_util.lowered_for_cuda(jax.jit(_tokamax_grad()),
                                                            spec, spec, spec))
  assert calls[TRITON] == 2 and not calls[MOSAIC], calls
  with platform.use("cpu"):
    text = jax.jit(_tokamax_grad()).trace(spec, spec, spec).lower().as_text()
  assert not gpu_util.custom_calls(text)


@needs_tokamax
def test_attention_tokamax_mosaic_lowers_for_hopper(hopper_host):
  spec = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  with platform.use("cuda"):
    calls = gpu_util.custom_calls(gpu_util.lowered_for_cuda(
        jax.jit(_tokamax_grad((hopper_host,))), spec, spec, spec))
  assert calls[MOSAIC] >= 2 and not calls[TRITON], calls  # forward and backward kernels


@needs_tokamax
@gpu_util.needs_gpu_compile
@pytest.mark.parametrize("target,d,dtype", [("h100-80gb", 256, jnp.bfloat16),
                                            pytest.param("h100-80gb", 64, jnp.float32,
                                                         marks=pytest.mark.slow),
                                            ("a100-80gb", 128, jnp.bfloat16)])
def test_attention_tokamax_triton_compiles(target, d, dtype):
  """XLA:GPU compiles tokamax's Triton kernels to cubins (shared memory and block limits
  checked), including the cases cuDNN refuses (head_dim 256, fp32)."""
  compiled = _compile(target, _tokamax_grad(), *[((1, 256, 2, d), dtype)] * 3)
  assert gpu_util.custom_calls(compiled.as_text())[TRITON] >= 2


@needs_tokamax
@gpu_util.needs_gpu_compile
def test_attention_tokamax_mosaic_compiles_for_h100(hopper_host):
  """The program around the Mosaic GPU kernels compiles for H100; the kernels themselves
  are compiled by the Mosaic GPU runtime on the device, so only their lowering is
  checked here."""
  compiled = _compile("h100-80gb", _tokamax_grad((hopper_host,)),
                      *[((1, 256, 2, 128), jnp.bfloat16)] * 3)
  assert gpu_util.custom_calls(compiled.as_text())[MOSAIC] >= 2


def _requested_smem(fn, *specs, target="h200"):
  """Shared memory a Triton kernel of `fn` requests, from a compile for `target` with a
  1024-byte per-block limit (XLA reports what the first kernel over it asked for)."""
  config = re.sub(r"shared_memory_per_block_optin: \d+",
                  "shared_memory_per_block_optin: 1024", gpu_targets.target_config(target))
  devices = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                         target_config=config).devices
  with pytest.raises(Exception, match="Shared memory size limit exceeded") as info:
    jax.jit(fn).trace(*_on(devices, *specs)).lower().compile()
  return int(re.search(r"requested (\d+)", str(info.value))[1])


# ------------------------------------------------------------------ ERA


def test_era_kernels_are_named():
  x = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  fn = jax.jit(jax.value_and_grad(
      lambda x: jnp.sum(era_mod.era(x, impl="pallas").astype(jnp.float32))))
  with platform.use("cuda"):
    text = gpu_util.lowered_for_cuda(fn, x)
  assert gpu_util.custom_calls(text)[TRITON] == 2
  assert '"era_fwd"' in text and '"era_bwd"' in text
