"""MoE kernels: the CPU grouped matmul (padded row blocks) against jax.lax.ragged_dot,
and the partitionable top-k against jax.lax.top_k."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.kernels import GroupLayout, grouped_matmul, partitionable_top_k
from vesperjax.model.layers import rank_topk_mask


@pytest.mark.parametrize("sizes,rows", [
    ([13, 0, 30, 7], 50),     # an empty group, 50 = all rows grouped
    ([0, 41, 0, 0], 60),      # one group has every row; 19 padding rows
    ([1, 1, 1, 1], 9),        # tiny groups
    ([25, 39], 64),           # sizes that straddle the blocks
])
def test_blocked_equals_ragged_dot_values_and_grads(sizes, rows):
  rng = np.random.default_rng()
  x = jnp.asarray(rng.normal(size=(rows, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(len(sizes), 12, 5)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
  sizes = jnp.asarray(sizes, jnp.int32)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w) * cot)

  ragged = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
  blocked = jax.jit(lambda x, w: grouped_matmul(x, w, sizes, impl="blocked", block_rows=8))
  np.testing.assert_allclose(blocked(x, w), ragged(x, w), rtol=1e-5, atol=1e-5)
  want = jax.grad(loss(ragged), (0, 1))(x, w)
  got = jax.grad(loss(blocked), (0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_blocked_layout_groups_rows_and_marks_padding():
  sizes = jnp.asarray([3, 0, 5], jnp.int32)
  layout = GroupLayout(sizes, 10, impl="blocked", block_rows=4)
  x = jnp.arange(10, dtype=jnp.float32)[:, None] + 1
  laid = np.asarray(layout.to_groups(x))[:, 0]
  group = np.asarray(layout.group)
  # group 0: rows 1..3 (one block), group 2: rows 4..8 (two blocks), rest padding
  np.testing.assert_array_equal(laid[group == 0], [1, 2, 3])
  np.testing.assert_array_equal(laid[group == 2], [4, 5, 6, 7, 8])
  np.testing.assert_array_equal(laid[group == 3], 0)
  back = np.asarray(layout.from_groups(layout.to_groups(x)))[:, 0]
  np.testing.assert_array_equal(back, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0])
  with pytest.raises(ValueError, match="grouped matmul impl"):
    GroupLayout(sizes, 10, impl="megablocks")


@pytest.mark.parametrize("impl", ["blocked", "ragged_dot"])
def test_per_row_values_and_grads(impl):
  """Each grouped row gets its group's value; the gradient is the per-group sum of the
  grouped rows' cotangents (padding rows' values are ignored, so they are masked)."""
  sizes = jnp.asarray([3, 0, 5], jnp.int32)
  layout = GroupLayout(sizes, 10, impl=impl, block_rows=4)
  grouped = np.asarray(layout.group) < 3
  v = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
  rows = np.asarray(layout.per_row(v))
  np.testing.assert_array_equal(rows[grouped], np.asarray(v)[np.asarray(layout.group)[grouped]])
  cot = np.random.default_rng(1).normal(size=rows.shape).astype(np.float32) * grouped[:, None]
  grad = jax.grad(lambda v: jnp.sum(layout.per_row(v) * cot))(v)
  want = np.zeros((3, 2), np.float32)
  np.add.at(want, np.asarray(layout.group)[grouped], cot[grouped])
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_rank_topk_mask_is_lax_top_k_with_ties():
  rng = np.random.default_rng()
  y = jnp.asarray(rng.integers(-3, 4, size=(64, 16)), jnp.float32)  # many ties
  bias = jnp.zeros((16,), jnp.float32)
  for k in (1, 4, 16):
    _, idx = jax.lax.top_k(jnp.abs(y), k)
    want = np.zeros((64, 16))
    np.put_along_axis(want, np.asarray(idx), 1.0, -1)
    np.testing.assert_array_equal(rank_topk_mask(y, bias, k), want)


def test_partitionable_top_k_is_lax_top_k_with_ties():
  rng = np.random.default_rng()
  x = jnp.asarray(rng.integers(-3, 4, size=(2, 32, 8)), jnp.float32)  # many ties
  for k in (1, 2, 8):
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = jax.jit(partitionable_top_k, static_argnums=1)(x, k)
    assert got_i.dtype == jnp.int32
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)
