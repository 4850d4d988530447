"""The fused Velvet / AdamW update as a Pallas Mosaic TPU kernel.

The same contract as the GPU kernels (``_velvet_update.py`` packs the leaves into fp32
1-D buckets and calls this through ``velvet_update(..., impl="tpu")``, or ``"auto"`` /
``"pallas"`` on a TPU target): one ``pallas_call`` per bucket reads p, g, m, v once and
writes update, m', v' over p, m, v in place (``input_output_aliases``); the step's
scalars are an input array in SMEM, so a new step never recompiles; per element the body
calls ``vesperjax.optim.velvet_math.velvet_element``, the one definition of Velvet's math.

TPU's layout rules shape the kernel:

* A bucket is viewed as ``[rows, 128]`` (128 lanes) and each grid step takes a
  ``[block_size // 128, 128]`` block whose row count is a multiple of 8: fp32 vregs are
  (8, 128) tiles, so ``block_size`` is a power of two >= 1024.
* VMEM: the Pallas pipeline double-buffers the four input and three output fp32
  blocks (56 bytes per element of a block) and the body's temporaries take about 20
  more: libtpu refused a 2^20-element block on v5p (75.6 MiB of its 64 MiB) and a 2^18
  one on v4 (19.2 MiB of its 16 MiB) in deviceless compiles. ``vmem_bytes`` bounds it by
  80 bytes per element: 5 MiB at the default block of 64 Ki elements, 10 MiB at the
  largest allowed (2^17), within the default scoped VMEM limit of every generation
  (16 MiB on v4 and v5e).
* The grid axis is ``parallel``: on chips with two TensorCores (v4, v5p) Mosaic splits
  the blocks between them.

Unlike Mosaic GPU modules, Mosaic TPU kernels are compiled by libtpu when the program is
compiled, so a deviceless compile for a TPU topology (tests/kernels/test_velvet_tpu.py) checks
the layouts, the VMEM budget and the block shapes completely; the numbers are checked in
Pallas's TPU interpret mode on CPU against the optimizer's reference.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vesperjax.optim.velvet_math import velvet_element

from . import _dispatch

LANES = 128  # the minor dimension of every block (a vreg's lanes)
SUBLANES = 8  # fp32 rows per vreg: block rows are a multiple of this
MIN_BLOCK_SIZE = SUBLANES * LANES
DEFAULT_BLOCK_SIZE = 1 << 16  # 512 rows: ~5 MiB of VMEM
MAX_BLOCK_SIZE = 1 << 17  # 1024 rows: ~10 MiB of VMEM, under v4's and v5e's 16 MiB
_INTERPRET_MAX_BLOCK = 1 << 22  # interpret mode: few, large blocks (each step is a pass)
NUM_SCALARS = 8
# 7 fp32 blocks (4 in, 3 out) double-buffered, and the body's temporaries (measured)
_BYTES_PER_ELEMENT = 2 * 7 * 4 + 24


def check_block_size(block_size, *, compiled):
  """ValueError unless ``block_size`` is a power of two >= 1024 (8 x 128: whole fp32
  vregs), and <= MAX_BLOCK_SIZE when ``compiled`` (VMEM)."""
  _dispatch.check_block("velvet_update: block_size", block_size, minimum=MIN_BLOCK_SIZE,
                        compiled=False)
  if compiled and block_size > MAX_BLOCK_SIZE:
    raise ValueError(f"velvet_update: block_size={block_size} exceeds the Mosaic TPU "
                     f"kernel's limit of {MAX_BLOCK_SIZE} elements (VMEM)")


def default_block_size(n, interpret):
  """The smallest power of two >= 1024 holding ``n`` elements, capped at the default
  (compiled) or at 2^22 elements (interpret mode: each grid step costs a pass)."""
  size = pl.next_power_of_2(max(int(n), MIN_BLOCK_SIZE))
  return min(size, _INTERPRET_MAX_BLOCK if interpret else DEFAULT_BLOCK_SIZE)


def vmem_bytes(block_size):
  """An upper bound on the kernel's VMEM at ``block_size`` (the scalars live in SMEM)."""
  return _BYTES_PER_ELEMENT * block_size


def _kernel(s_ref, p_ref, g_ref, m_ref, v_ref, u_ref, mo_ref, vo_ref, *, skip_zero_grads):
  lr, b1, b2, eps, wd, bc1, bc2 = (s_ref[i] for i in range(7))
  u, m1, v1 = velvet_element(p_ref[...], g_ref[...], m_ref[...], v_ref[...], lr=lr,
                             b1=b1, b2=b2, eps=eps, weight_decay=wd, bc1=bc1, bc2=bc2,
                             skip_zero_grads=skip_zero_grads)
  u_ref[...] = u
  mo_ref[...] = m1
  vo_ref[...] = v1


def velvet_update_flat(p, g, m, v, scalars, *, skip_zero_grads=False, block_size,
                       interpret=False):
  """The Mosaic TPU kernel on fp32 1-D buckets whose length is a multiple of
  ``block_size`` (a power of two >= 1024).

  ``scalars``: ``lr, b1, b2, eps, wd, 1 - b1^t, 1 - b2^t`` (padded with zeros to
  NUM_SCALARS floats). Returns ``(update, m', v')``, all fp32; p, m and v are aliased to
  them (donate the buckets to update in place). ``interpret``: run in Pallas's TPU
  interpreter on CPU (tests).
  """
  check_block_size(block_size, compiled=not interpret)
  n = p.shape[0]
  if n % block_size:
    raise ValueError(f"bucket length {n} is not a multiple of block_size {block_size}")
  f32 = jnp.float32
  rows, block_rows = n // LANES, block_size // LANES
  blk = pl.BlockSpec((block_rows, LANES), lambda i: (i, 0))
  out = jax.ShapeDtypeStruct((rows, LANES), f32)
  scalars = jnp.asarray(scalars, f32).reshape(-1)
  scalars = jnp.pad(scalars, (0, NUM_SCALARS - scalars.shape[0]))
  call = pl.pallas_call(
      functools.partial(_kernel, skip_zero_grads=skip_zero_grads),
      grid=(rows // block_rows,),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), blk, blk, blk, blk],
      out_specs=[blk, blk, blk],
      out_shape=[out, out, out],
      input_output_aliases={1: 0, 3: 1, 4: 2},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="velvet_update_tpu",
  )
  as_rows = lambda x: x.astype(f32).reshape(rows, LANES)
  u, m1, v1 = call(scalars, *map(as_rows, (p, g, m, v)))
  return u.reshape(n), m1.reshape(n), v1.reshape(n)
