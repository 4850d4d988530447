"""Grouped matmuls for MoE: rows sorted by group (expert), each group times its own weight.

Implementations (`IMPLEMENTATIONS`, the model's `moe_matmul`):

- "ragged_dot": `jax.lax.ragged_dot`, the native op. XLA:CPU lowers it to every group's
  matmul over all rows, masked: G times the work; XLA:GPU (jax 0.10's) rewrites it into
  one dense dot of the rows spread over G zero-padded slots: G times the work too. On TPU
  it is a real grouped GEMM.
- "tokamax": `tokamax.ragged_dot` (the `gpu` extra, imported on first use): Pallas Mosaic
  GPU kernels on Hopper and later, Pallas Triton on Ampere, its XLA path (= ragged_dot)
  elsewhere; the first of the target platform's `platform.CHOICES["tokamax_ragged_dot"]`
  that tokamax supports runs; the forward and both gradients are tokamax ragged dots.
- "blocked": pads each group to whole blocks of rows, so that every block belongs to one
  group, and a grouped matmul is one batched matmul of the blocks against their gathered
  weights: as many blocks as the worst routing needs (`blocks_needed`, under G more than
  the rows fill).

Rows are laid out once per MoE layer, not once per matmul. "auto" takes the first
available entry of the "grouped_matmul" row of `platform.CHOICES`; the CPU timings are in
docs/benchmarks.md (`benchmarks/cpu_matmul_forms.py`), the GPU ones come from
`benchmarks/kernel_checks.py`.

Shape suffixes: M rows in input order (sorted by group, padding rows last), R laid-out
rows, G groups, D input features, F output features; blocked layout: J blocks of S rows
(R = J * S).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import platform

IMPLEMENTATIONS = ("auto", "blocked", "ragged_dot", "tokamax")
_UNLAID = ("ragged_dot", "tokamax")  # rows stay in input order: the op takes group sizes


class GroupLayout:
  """Where each group's rows live for the grouped matmuls of one MoE layer.

  `to_groups` takes rows sorted by group (rows past the groups are padding) into the
  layout, `matmul` multiplies laid-out rows by their group's weight, `from_groups` brings
  laid-out rows back in input order (padding rows: 0). `group` [R] is each laid-out row's
  group, = G for a row in none.
  """

  def __init__(self, group_sizes_G: jax.Array, rows: int, *, impl: str = "auto",
               block_rows: int = 256):
    self.impl = impl = resolve(impl)
    self.sizes = group_sizes_G.astype(jnp.int32)
    groups = self.sizes.shape[0]
    ends_G = jnp.cumsum(self.sizes)
    group_M = jnp.searchsorted(ends_G, jnp.arange(rows), side="right")  # G: in none
    if impl in _UNLAID:
      self.group = group_M
      return
    s = max(8, min(block_rows, -(-rows // 8) * 8))
    num_blocks = blocks_needed(rows, groups, s)
    row_start_G = ends_G - self.sizes
    blocks_G = -(-self.sizes // s)
    block_start_G = jnp.cumsum(blocks_G) - blocks_G
    j_J = jnp.arange(num_blocks)
    block_group_J = jnp.searchsorted(jnp.cumsum(blocks_G), j_J, side="right")  # G: unused
    clamped_J = jnp.minimum(block_group_J, groups - 1)
    within_JxS = (j_J - block_start_G[clamped_J])[:, None] * s + jnp.arange(s)
    filled_JxS = ((block_group_J < groups)[:, None]
                  & (within_JxS < self.sizes[clamped_J][:, None]))
    self.block_rows, self.num_blocks, self.block_group = s, num_blocks, clamped_J
    self.source = jnp.where(filled_JxS, row_start_G[clamped_J][:, None] + within_JxS,
                            rows).reshape(-1)
    self.group = jnp.where(filled_JxS, clamped_J[:, None], groups).reshape(-1)
    g_M = jnp.minimum(group_M, groups - 1)
    self.slot = jnp.where(group_M < groups, block_start_G[g_M] * s + jnp.arange(rows) -
                          row_start_G[g_M], num_blocks * s)

  def to_groups(self, x_MxD: jax.Array) -> jax.Array:
    """Rows in input order [M, D] -> laid out [R, D] (padding rows: 0)."""
    if self.impl in _UNLAID:
      return x_MxD
    return x_MxD.at[self.source].get(mode="fill", fill_value=0)

  def from_groups(self, y_RxF: jax.Array) -> jax.Array:
    """Laid-out rows [R, F] -> input order [M, F] (rows in no group: 0)."""
    if self.impl in _UNLAID:
      return jnp.where((self.group < self.sizes.shape[0])[:, None], y_RxF, 0)
    return y_RxF.at[self.slot].get(mode="fill", fill_value=0)

  def per_row(self, v_Gx: jax.Array) -> jax.Array:
    """v [G, ...] -> each laid-out row's group's v [R, ...] (padding rows: some group's;
    their outputs are ignored). Blocked: one value per block, broadcast over its rows, so
    the gradient is a sum per block, not a scatter-add of every row."""
    if self.impl in _UNLAID:
      return v_Gx[jnp.minimum(self.group, v_Gx.shape[0] - 1)]
    per_block = jnp.take(v_Gx, self.block_group, axis=0, mode="clip")
    rows = jnp.broadcast_to(per_block[:, None],
                            (self.num_blocks, self.block_rows, *v_Gx.shape[1:]))
    return rows.reshape(self.num_blocks * self.block_rows, *v_Gx.shape[1:])

  def matmul(self, x_RxD: jax.Array, w_GxDxF: jax.Array) -> jax.Array:
    """Laid-out rows [R, D] times their group's w [G, D, F] -> [R, F]."""
    if self.impl == "ragged_dot":
      return jax.lax.ragged_dot(x_RxD, w_GxDxF, self.sizes)
    if self.impl == "tokamax":
      # Rows past the groups are zeroed on the way in and out: a kernel may leave them
      # unwritten, and zeroing the input also zeroes their gradient.
      grouped_R1 = (self.group < self.sizes.shape[0])[:, None]
      y_RxF = tokamax_ragged_dot(jnp.where(grouped_R1, x_RxD, 0), w_GxDxF, self.sizes)
      return jnp.where(grouped_R1, y_RxF, 0)
    s, j = self.block_rows, self.num_blocks
    y_JxSxF = _block_matmul(x_RxD.reshape(j, s, -1), w_GxDxF, self.block_group)
    return y_JxSxF.reshape(j * s, -1)


def blocks_needed(rows: int, groups: int, block_rows: int) -> int:
  """The most blocks of S = `block_rows` rows that any split of `rows` rows into `groups`
  groups takes, each group in whole blocks of its own: with k <= min(G, rows) groups
  non-empty, sum_g ceil(n_g / S) <= (rows + k (S - 1)) / S, reached when each of them
  has one row past whole blocks."""
  return (rows + min(groups, rows) * (block_rows - 1)) // block_rows


@jax.custom_vjp
def _block_matmul(x_JxSxD, w_GxDxF, block_group_J):
  """x [J, S, D] @ w[block_group] [J, D, F].

  The backward is written out so that dx gathers the weights as the forward does and
  contracts their last axis (gathering transposed weights instead fuses the transpose
  into the gather, which XLA:CPU runs far slower), and the weight gradient is one batched
  dot per block, summed per group.
  """
  return jnp.einsum("jsd,jdf->jsf", x_JxSxD, _take_blocks(w_GxDxF, block_group_J),
                    preferred_element_type=x_JxSxD.dtype)


def _take_blocks(w_GxDxF, block_group_J):
  """Each block's group's weight [J, D, F] (clip mode: block_group is in range, and
  XLA:CPU's gather then skips fill mode's bounds masking)."""
  return jnp.take(w_GxDxF, block_group_J, axis=0, mode="clip")


def _block_matmul_fwd(x_JxSxD, w_GxDxF, block_group_J):
  return (_block_matmul(x_JxSxD, w_GxDxF, block_group_J),
          (x_JxSxD, w_GxDxF, block_group_J))


def _block_matmul_bwd(res, dy_JxSxF):
  x_JxSxD, w_GxDxF, block_group_J = res
  dx_JxSxD = jnp.einsum("jsf,jdf->jsd", dy_JxSxF, _take_blocks(w_GxDxF, block_group_J),
                        preferred_element_type=x_JxSxD.dtype)
  x_JxDxS = jnp.swapaxes(x_JxSxD, 1, 2)
  dw_JxDxF = jnp.einsum("jds,jsf->jdf", x_JxDxS, dy_JxSxF, preferred_element_type=w_GxDxF.dtype)
  dw_GxDxF = jax.ops.segment_sum(dw_JxDxF, block_group_J, num_segments=w_GxDxF.shape[0])
  return _sum_like(dx_JxSxD, x_JxSxD), _sum_like(dw_GxDxF, w_GxDxF), None


def _sum_like(cotangent, primal):
  """Inside shard_map, a primal the same on devices whose other operand differs (w over
  token shards, x over `tensor` shards of w) gets the sum of their cotangents, as
  autodiff gives it: psum over the mesh axes the cotangent varies on and it does not."""
  extra = tuple(sorted(_varying_axes(cotangent) - _varying_axes(primal)))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


def _varying_axes(x) -> set:
  """Manual mesh axes a value varies over inside shard_map (empty outside)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # jax 0.10
  return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def grouped_matmul(x_MxD: jax.Array, w_GxDxF: jax.Array, group_sizes_G: jax.Array, *,
                   impl: str = "auto", block_rows: int = 256) -> jax.Array:
  """`ragged_dot(x [M, D], w [G, D, F], group_sizes [G])` -> [M, F]: rows past the groups
  get 0. `impl`: one of IMPLEMENTATIONS ("auto": the target platform's row of
  `platform.CHOICES`)."""
  layout = GroupLayout(group_sizes_G, x_MxD.shape[0], impl=impl, block_rows=block_rows)
  return layout.from_groups(layout.matmul(layout.to_groups(x_MxD), w_GxDxF))


def resolve(impl: str) -> str:
  """`impl` (one of IMPLEMENTATIONS) as the implementation that runs: "auto" is the first
  entry of the target platform's "grouped_matmul" row whose package is installed."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"grouped matmul impl {impl!r}: choose from {IMPLEMENTATIONS}")
  if impl != "auto":
    return impl
  options = platform.choice("grouped_matmul")
  options = (options,) if isinstance(options, str) else options
  for option in options[:-1]:
    if option != "tokamax" or _tokamax_installed():
      return option
  return options[-1]


def _tokamax_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("tokamax") is not None


def tokamax_ragged_dot(x_MxD: jax.Array, w_GxDxF: jax.Array, group_sizes_G: jax.Array,
                       implementation=None) -> jax.Array:
  """`tokamax.ragged_dot` [M, D] x [G, D, F] -> [M, F], forward and backward through
  tokamax with `implementation` (default: the target platform's
  `platform.CHOICES["tokamax_ragged_dot"]`, the first one tokamax supports runs);
  a ValueError naming the `gpu` extra when tokamax is missing."""
  _import_tokamax()
  if implementation is None:
    implementation = platform.choice("tokamax_ragged_dot")
  implementation = (implementation,) if isinstance(implementation, str) else tuple(
      implementation)
  if platform.current() != "cuda":
    return _tokamax_matmul(x_MxD, w_GxDxF, group_sizes_G, implementation)
  # tokamax's Mosaic GPU kernel fails to lower unless every dimension is whole tiles and
  # blocks (e.g. FlyLoRA's hidden + rank, or its rank-wide projection, are not):
  # zero-pad to whole 128-element blocks, then slice.
  (m, d), f = x_MxD.shape, w_GxDxF.shape[2]
  pm, pd, pf = _round_up(m, 64), _round_up(d, 128), _round_up(f, 128)
  x_MxD = jnp.pad(x_MxD, ((0, pm - m), (0, pd - d)))  # extra rows: in no group
  w_GxDxF = jnp.pad(w_GxDxF, ((0, 0), (0, pd - d), (0, pf - f)))
  return _tokamax_matmul(x_MxD, w_GxDxF, group_sizes_G, implementation)[:m, :f]


def _import_tokamax():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError:  # a ValueError: the CLIs report bad input as one `error:` line
    raise ValueError("moe_matmul='tokamax' needs tokamax: pip install 'vesperjax[gpu]'"
                     ) from None
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # tokamax reads absl flags: never parse our CLI's argv
    flags.FLAGS.mark_as_parsed()
  return tokamax


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tokamax_matmul(x_MxD, w_GxDxF, group_sizes_G, implementation):
  """tokamax's ragged dot with its backward written out as tokamax's own (two more ragged
  dots), so that inside shard_map each gradient gets its primal's varying mesh axes:
  tokamax's GPU kernels return values that carry none, which jax's custom_vjp check
  refuses under an expert mesh."""
  y_MxF = _import_tokamax().ragged_dot_general(
      x_MxD, w_GxDxF, group_sizes_G, _DIMS["default"], implementation=implementation)
  return _vary_like(y_MxF, _varying_axes(x_MxD) | _varying_axes(w_GxDxF))


def _tokamax_matmul_fwd(x_MxD, w_GxDxF, group_sizes_G, implementation):
  return (_tokamax_matmul(x_MxD, w_GxDxF, group_sizes_G, implementation),
          (x_MxD, w_GxDxF, group_sizes_G))


def _tokamax_matmul_bwd(implementation, res, dy_MxF):
  x_MxD, w_GxDxF, group_sizes_G = res
  tokamax = _import_tokamax()
  dx_MxD = tokamax.ragged_dot_general(
      dy_MxF, w_GxDxF, group_sizes_G, _DIMS["transposed_rhs"],
      preferred_element_type=x_MxD.dtype, implementation=implementation)
  dw_GxDxF = tokamax.ragged_dot_general(
      x_MxD, dy_MxF, group_sizes_G, _DIMS["ragged_contracting"],
      preferred_element_type=w_GxDxF.dtype, implementation=implementation)
  return _gradient_for(dx_MxD, x_MxD), _gradient_for(dw_GxDxF, w_GxDxF), None


_tokamax_matmul.defvjp(_tokamax_matmul_fwd, _tokamax_matmul_bwd)

# [M, D] x [G, D, F] -> [M, F]; its dx [M, F] x [G, D, F]^T; its dw [M, D]^T [M, F] per group
_DIMS = {
    "default": jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [1]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0]),
    "transposed_rhs": jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[0]),
    "ragged_contracting": jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
        rhs_group_dimensions=[]),
}


def _gradient_for(cotangent, primal):
  """`cotangent` summed over the mesh axes only it varies on, and marked varying over
  those only `primal` varies on (inside shard_map; unchanged outside)."""
  return _vary_like(_sum_like(cotangent, primal), _varying_axes(primal))


def _vary_like(x, axes: set):
  missing = tuple(sorted(axes - _varying_axes(x)))
  if not missing:
    return x
  pcast = getattr(jax.lax, "pcast", None)
  return pcast(x, missing, to="varying") if pcast else jax.lax.pvary(x, missing)


def _round_up(size: int, multiple: int) -> int:
  return -(-size // multiple) * multiple
