"""The fused Velvet / AdamW update as a Pallas Mosaic GPU kernel (Hopper, sm_90+).

The same contract as the Pallas Triton kernel in ``_velvet_update.py`` (which packs the
leaves into buckets and calls this through ``velvet_update(..., impl="mosaic")``): one
launch per fp32 1-D bucket reads p, g, m, v once and writes update, m', v'; the step's
scalars are an input array, so a new step never recompiles; per element the body calls
``vesperjax.optim.velvet_math.velvet_element``, the one definition of Velvet's math.

Mosaic GPU's limits shape the kernel:

* TMA copies take at most 256 elements along each dimension, so a bucket is viewed as
  ``[rows, 128]`` and each program copies a ``[block_size // 128, 128]`` block
  (``block_size`` <= 256 * 128) from global into shared memory.
* A copy moves a multiple of 128 bytes (one warpgroup's worth), so the scalars travel
  padded to 32 floats.
* Mosaic GPU lowers no ``sqrt``: the body passes ``velvet_element`` a square root
  through ``rsqrt`` (exact at 0).

One block per program: the programs' copies overlap across the SM's resident blocks
(each block's four fp32 buffers take ``16 * block_size`` bytes of shared memory; the
results are written over the inputs' buffers). No ``emit_pipeline``: its predicated
copies have no interpret-mode form, and a per-block program keeps the CPU test on the
exact kernel that runs on the GPU.
"""
import functools

import jax
import jax.numpy as jnp

from vesperjax.optim.velvet_math import velvet_element

from . import _dispatch

LANES = 128  # the minor dimension of every block
MAX_BLOCK_ROWS = 256  # TMA: at most 256 elements along each dimension
MAX_BLOCK_SIZE = MAX_BLOCK_ROWS * LANES
DEFAULT_BLOCK_SIZE = 4096  # 32 rows: 64 KiB of shared memory per program
NUM_SCALARS = 32  # a TMA copy moves a multiple of 128 bytes
_BLOCKS = "blocks"


def check_block_size(block_size, *, compiled):
  """ValueError unless ``block_size`` is a power of two >= 128 (<= 256 * 128 when
  ``compiled``: TMA copies take at most 256 rows)."""
  _dispatch.check_block("velvet_update: block_size", block_size, minimum=LANES,
                        compiled=False)
  if compiled and block_size > MAX_BLOCK_SIZE:
    raise ValueError(f"velvet_update: block_size={block_size} exceeds Mosaic GPU's "
                     f"limit of {MAX_BLOCK_SIZE} elements (256 rows of 128: TMA copies)")


def _sqrt(x):
  """sqrt through rsqrt (Mosaic GPU has no sqrt lowering); 0 at 0 (x * rsqrt(x) is NaN)."""
  return jnp.where(x > 0, x * jax.lax.rsqrt(x), jnp.zeros_like(x))


def _body(s_gmem, p_gmem, g_gmem, m_gmem, v_gmem, u_out, m_out, v_out,
          s_smem, p_smem, g_smem, m_smem, v_smem, barriers, *, block_rows,
          skip_zero_grads):
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  rows = pl.ds(jax.lax.axis_index(_BLOCKS) * block_rows, block_rows)
  plgpu.copy_gmem_to_smem(s_gmem, s_smem, barriers.at[0])
  srcs = (p_gmem, g_gmem, m_gmem, v_gmem)
  smems = (p_smem, g_smem, m_smem, v_smem)
  for k, (src, dst) in enumerate(zip(srcs, smems)):
    plgpu.copy_gmem_to_smem(src.at[rows], dst, barriers.at[k + 1])
  for k in range(len(srcs) + 1):
    plgpu.barrier_wait(barriers.at[k])
  lr, b1, b2, eps, wd, bc1, bc2 = (s_smem[i] for i in range(7))
  u, m1, v1 = velvet_element(p_smem[...], g_smem[...], m_smem[...], v_smem[...], lr=lr,
                             b1=b1, b2=b2, eps=eps, weight_decay=wd, bc1=bc1, bc2=bc2,
                             skip_zero_grads=skip_zero_grads, sqrt=_sqrt)
  p_smem[...] = u
  m_smem[...] = m1
  v_smem[...] = v1
  plgpu.commit_smem()
  for src, dst in ((p_smem, u_out), (m_smem, m_out), (v_smem, v_out)):
    plgpu.copy_smem_to_gmem(src, dst.at[rows])
  plgpu.wait_smem_to_gmem(0)


def interpret_params():
  """Mosaic GPU's CPU interpreter settings (simulated shared memory, TMA and barriers).

  Private in jax 0.10 (``jax._src``): ImportError names the version when it moves."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"velvet_update(impl='mosaic', interpret=True): this jax "
                      f"({jax.__version__}) has no Mosaic GPU interpret mode ({e})") from e
  return InterpretGPUParams()


def pad_scalars(scalars):
  """The step's scalars (``_velvet_update._scalars``) padded to NUM_SCALARS floats."""
  scalars = jnp.asarray(scalars, jnp.float32).reshape(-1)
  return jnp.pad(scalars, (0, NUM_SCALARS - scalars.shape[0]))


def velvet_update_flat(p, g, m, v, scalars, *, skip_zero_grads=False, block_size,
                       interpret=False):
  """The Mosaic GPU kernel on fp32 1-D buckets whose length is a multiple of
  ``block_size`` (a power of two in [128, 256 * 128]).

  ``scalars``: ``lr, b1, b2, eps, wd, 1 - b1^t, 1 - b2^t`` (padded with zeros to any
  length <= NUM_SCALARS). Returns ``(update, m', v')``, all fp32.
  ``interpret``: run on CPU in Mosaic GPU's interpreter (tests).
  """
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  check_block_size(block_size, compiled=not interpret)
  n = p.shape[0]
  if n % block_size:
    raise ValueError(f"bucket length {n} is not a multiple of block_size {block_size}")
  f32 = jnp.float32
  block_rows = block_size // LANES
  block = plgpu.SMEM((block_rows, LANES), f32)
  out = jax.ShapeDtypeStruct((n // LANES, LANES), f32)
  kernel = plgpu.kernel(
      functools.partial(_body, block_rows=block_rows, skip_zero_grads=skip_zero_grads),
      out_type=(out, out, out),
      scratch_types=(plgpu.SMEM((NUM_SCALARS,), f32), block, block, block, block,
                     plgpu.Barrier(num_arrivals=1, num_barriers=5)),
      grid=(n // block_size,), grid_names=(_BLOCKS,),
      compiler_params=plgpu.CompilerParams(),
      interpret=interpret_params() if interpret else None,
  )
  as_rows = lambda x: x.astype(f32).reshape(n // LANES, LANES)
  u, m1, v1 = kernel(pad_scalars(scalars), *map(as_rows, (p, g, m, v)))
  return u.reshape(n), m1.reshape(n), v1.reshape(n)
