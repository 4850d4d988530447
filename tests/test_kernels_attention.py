"""Attention dispatch: XLA and the Pallas flash kernel (interpret) vs naive attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.kernels import _attention as att
from vesperjax.kernels import platform


def _qkv(shape, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(sum(shape)), 3)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks]


@pytest.mark.parametrize("causal", [True, False])
def test_xla_and_auto_match_reference(causal):
  q, k, v = _qkv((2, 24, 3, 16))
  ref = att.attention_reference(q, k, v, causal=causal)
  for impl in (None, "xla"):
    np.testing.assert_allclose(att.attention(q, k, v, causal, impl), ref, rtol=2e-5, atol=2e-5)


def test_pallas_flash_interpret_forward():
  """Forward only: the backward is JAX's own (tested upstream) and slow to interpret."""
  q, k, v = _qkv((1, 32, 2, 16))
  out = att.attention(q, k, v, True, "pallas", interpret=True)
  np.testing.assert_allclose(out, att.attention_reference(q, k, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seq,block", [(100, 64), (256, None), (48, 16)])
def test_blocked_matches_reference_values_and_grads(seq, block):
  """Query blocks against key prefixes, including a ragged last block."""
  q, k, v = _qkv((2, seq, 3, 16))
  cot = jax.random.normal(jax.random.key(seq), q.shape)
  ref = lambda q, k, v: jnp.sum(att.attention_reference(q, k, v) * cot)
  got = lambda q, k, v: jnp.sum(att.attention_blocked(q, k, v, block=block) * cot)
  np.testing.assert_allclose(att.attention_blocked(q, k, v, block=block),
                             att.attention_reference(q, k, v), rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.jit(jax.grad(got, (0, 1, 2)))(q, k, v),
                  jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_choice_table_on_cpu():
  q, k, v = _qkv((1, 16, 1, 8), jnp.bfloat16)
  assert att.cudnn_supported(q, k, v)
  # no CUDA: blocked causal self-attention measured fastest on CPU; short or cross: einsum
  assert att._choose(q, k, v, None) == "reference"
  q, k, v = _qkv((1, 128, 1, 8))
  assert att._choose(q, k, v, None) == "blocked"
  assert att._choose(q, k[:, :64], v[:, :64], None) == "reference"
  with pytest.raises(ValueError):
    att.attention(q, k, v, True, "flash")


def test_pallas_blocks_shrink_to_fit_shared_memory():
  """Blocks shrink (largest tile first) until the estimate fits SMEM_LIMIT_BYTES."""
  assert att.pallas_block_sizes(256, 64, jnp.bfloat16).block_q == 128
  for d, dtype in ((256, jnp.bfloat16), (256, jnp.float32), (128, jnp.float32)):
    blocks = att.pallas_block_sizes(256, d, dtype)
    fwd = att.pallas_smem_bytes(blocks.block_q, blocks.block_k, d, dtype)
    bwd = att.pallas_bwd_smem_bytes(blocks.block_q_dkv, d, dtype)
    assert max(fwd, bwd) <= att.SMEM_LIMIT_BYTES, (d, dtype, blocks)
  assert att.pallas_block_sizes(256, 256, jnp.bfloat16).block_k == 64  # 128x128 asks 327680 B


def test_pallas_guard_error_is_one_clear_line():
  with pytest.raises(ValueError) as info:
    att.pallas_block_sizes(256, 2048, jnp.float32)
  message = str(info.value)
  assert "\n" not in message and "head_dim 2048" in message and "shared memory" in message
  q = jax.ShapeDtypeStruct((1, 256, 2, 2048), jnp.float32)
  with platform.use("cuda"), pytest.raises(ValueError, match="head_dim 2048"):
    jax.eval_shape(lambda q: att.attention(q, q, q, True, "pallas"), q)
  # interpret mode has no shared memory to run out of
  jax.eval_shape(lambda q: att.attention(q, q, q, True, "pallas", interpret=True), q)
