"""MoE kernels: every grouped-matmul implementation (padded row blocks, jax.lax.ragged_dot,
tokamax.ragged_dot through its XLA path) against a loop over experts, in the MoE layer
too (expert-parallel included), and the partitionable top-k against jax.lax.top_k."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax import sharding as sh
from vesperjax.config import MOE_MATMULS
from vesperjax.kernels import GroupLayout, grouped_matmul, partitionable_top_k, platform
from vesperjax.kernels import _grouped_matmul
from vesperjax.model.layers import rank_topk_mask
from vesperjax.model.moe import MoE

CHOICES = ("blocked", "ragged_dot", "tokamax")


def _loop_over_experts(x, w, sizes, cot):
  """numpy: y = x[rows of g] @ w[g] per group, and the gradients of sum(y * cot)."""
  x, w, cot = (np.asarray(a, np.float64) for a in (x, w, cot))
  y, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
  start = 0
  for g, size in enumerate(sizes):
    rows = slice(start, start + size)
    y[rows] = x[rows] @ w[g]
    dx[rows] = cot[rows] @ w[g].T
    dw[g] = x[rows].T @ cot[rows]
    start += size
  return y, dx, dw


@pytest.mark.parametrize("impl", CHOICES)
@pytest.mark.parametrize("sizes,rows", [
    ([13, 0, 30, 7], 50),     # an empty group, 50 = all rows grouped
    ([0, 41, 0, 0], 60),      # one group has every row; 19 padding rows
])
def test_each_choice_equals_a_loop_over_experts(impl, sizes, rows):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(rows, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(len(sizes), 12, 5)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
  want_y, want_dx, want_dw = _loop_over_experts(x, w, sizes, cot)
  fn = lambda x, w: grouped_matmul(x, w, jnp.asarray(sizes, jnp.int32), impl=impl,
                                   block_rows=8)
  np.testing.assert_allclose(jax.jit(fn)(x, w), want_y, rtol=1e-5, atol=1e-5)
  dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) * cot), (0, 1)))(x, w)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


def test_tokamax_padding_for_gpu_kernels_keeps_the_numbers():
  """Traced for CUDA, tokamax's operands are zero-padded to whole kernel blocks and the
  result sliced back (run here through tokamax's XLA path)."""
  sizes = [13, 0, 30, 7]
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(53, 12)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 12, 5)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(53, 5)), jnp.float32)
  want_y, want_dx, want_dw = _loop_over_experts(x, w, sizes, cot)
  fn = lambda x, w: _grouped_matmul.tokamax_ragged_dot(
      x, w, jnp.asarray(sizes, jnp.int32), implementation="xla")
  with platform.use("cuda"):
    assert "pad" in str(jax.make_jaxpr(fn)(x, w))
    grads = jax.grad(lambda x, w: jnp.sum(fn(x, w) * cot), (0, 1))(x, w)
    y = fn(x, w)
  for got, want in zip((y, *grads), (want_y, want_dx, want_dw)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_auto_takes_the_platform_row_and_skips_a_missing_tokamax(monkeypatch):
  assert MOE_MATMULS == _grouped_matmul.IMPLEMENTATIONS
  with platform.use("cpu"):
    assert _grouped_matmul.resolve("auto") == "blocked"
  with platform.use("cuda"):
    assert _grouped_matmul.resolve("auto") == "tokamax"  # installed in the test env
    monkeypatch.setattr(_grouped_matmul, "_tokamax_installed", lambda: False)
    assert _grouped_matmul.resolve("auto") == "blocked"
    assert _grouped_matmul.resolve("ragged_dot") == "ragged_dot"  # explicit: as asked


def test_missing_tokamax_is_one_error_naming_the_gpu_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # import tokamax -> ImportError
  with pytest.raises(ValueError, match=r"pip install 'vesperjax\[gpu\]'"):
    grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 2)), jnp.asarray([2, 2]),
                   impl="tokamax")


def test_moe_matmul_config_key_is_validated():
  with pytest.raises(ValueError, match="moe_matmul"):
    vj.ModelConfig(num_experts=4, moe_matmul="megablocks")
  assert "moe_matmul" in vj.config.EXECUTION_FIELDS


def _moe(impl, cf=None):
  cfg = vj.ModelConfig(hidden_size=32, num_heads=2, num_layers=1, ffn_size=64,
                       vocab_size=128, lora_rank=4, lora_topk=2, num_experts=4, top_k=2,
                       moe_capacity_factor=cf, moe_matmul=impl)
  moe = MoE(cfg, nnx.Rngs(0))
  for i, lin in enumerate((moe.gate, moe.up)):  # give the adapters something to do
    lin.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), lin.lora_b.shape)
  return nnx.split(moe)


def _layer_and_grads(graphdef, state, x):
  def loss(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return jnp.sum(y ** 2) + aux["load_balance_loss"], y
  (_, y), (dstate, dx) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(state, x)
  return jax.tree.map(np.asarray, (y, dx, nnx.to_pure_dict(dstate)))


X = jax.random.normal(jax.random.key(2), (8, 12, 32))


@pytest.mark.parametrize("impl", ["ragged_dot", "tokamax"])
@pytest.mark.parametrize("cf", [None, 0.75], ids=["dropless", "capacity"])
def test_moe_layer_with_each_choice_equals_blocked(impl, cf):
  """Values and gradients (inputs and every weight), dropped rows included, on one
  device and expert-parallel over 8 simulated devices."""
  want = _layer_and_grads(*_moe("blocked", cf), X)
  graphdef, state = _moe(impl, cf)
  got = _layer_and_grads(graphdef, state, X)
  check = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jax.tree.map(check, got, want)
  if cf is not None:
    return  # per-device capacity drops differently: tests/model/test_moe.py covers it
  mesh = sh.make_mesh(data=2, expert=4)
  with jax.set_mesh(mesh):
    placed = jax.device_put(state, sh.state_shardings(state, mesh))
    x = jax.device_put(X, sh.batch_sharding(mesh, ndim=3))
    jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(placed, x))
    got = _layer_and_grads(graphdef, placed, x)
  assert "all_to_all" in jaxpr and "ragged_dot" in jaxpr  # expert-parallel, no blocks
  jax.tree.map(check, got, want)


@pytest.mark.parametrize("sizes,rows", [
    ([13, 0, 30, 7], 50),     # an empty group, 50 = all rows grouped
    ([0, 41, 0, 0], 60),      # one group has every row; 19 padding rows
    ([1, 1, 1, 1], 9),        # tiny groups
    ([25, 39], 64),           # sizes that straddle the blocks
])
def test_blocked_equals_ragged_dot_values_and_grads(sizes, rows):
  rng = np.random.default_rng(rows)
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


@pytest.mark.parametrize("impl", CHOICES)
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
  rng = np.random.default_rng(1)
  y = jnp.asarray(rng.integers(-3, 4, size=(64, 16)), jnp.float32)  # many ties
  bias = jnp.zeros((16,), jnp.float32)
  for k in (1, 4, 16):
    _, idx = jax.lax.top_k(jnp.abs(y), k)
    want = np.zeros((64, 16))
    np.put_along_axis(want, np.asarray(idx), 1.0, -1)
    np.testing.assert_array_equal(rank_topk_mask(y, bias, k), want)


def test_partitionable_top_k_is_lax_top_k_with_ties():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.integers(-3, 4, size=(2, 32, 8)), jnp.float32)  # many ties
  for k in (1, 2, 8):
    want_v, want_i = jax.lax.top_k(x, k)
    got_v, got_i = jax.jit(partitionable_top_k, static_argnums=1)(x, k)
    assert got_i.dtype == jnp.int32
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_v, want_v)


def test_blocks_needed_is_the_worst_split():
  """`blocks_needed` is the most blocks any split of the rows into groups takes (every
  split, enumerated), so the blocked layout's static block count always suffices."""
  import itertools  # pylint: disable=g-import-not-at-top
  for rows, groups, s in itertools.product(range(1, 13), range(1, 4), (1, 2, 4, 5)):
    worst = max(sum(-(-n // s) for n in split)
                for split in itertools.product(range(rows + 1), repeat=groups)
                if sum(split) <= rows)
    assert _grouped_matmul.blocks_needed(rows, groups, s) == worst, (rows, groups, s)
  assert _grouped_matmul.blocks_needed(4096, 4, 256) == 19  # tiny-moe's 2048 tokens x 2


@pytest.mark.parametrize("sizes", [[9, 9, 9, 9], [1, 1, 1, 33], [36, 0, 0, 0]])
def test_blocked_worst_case_routings_fit(sizes):
  """Splits that need every block (each group one row past whole blocks) and the
  lopsided ones equal the loop over experts."""
  rows = sum(sizes)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(rows, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
  layout = GroupLayout(jnp.asarray(sizes, jnp.int32), rows, impl="blocked", block_rows=8)
  assert layout.num_blocks == 8  # (36 + 4 * 7) // 8
  got = layout.from_groups(layout.matmul(layout.to_groups(x), w))
  np.testing.assert_allclose(got, _loop_over_experts(x, w, sizes, np.zeros((rows, 3)))[0],
                             rtol=1e-5, atol=1e-5)
