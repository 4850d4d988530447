"""Attention as jax's splash attention (``jax.experimental.pallas.ops.tpu``): a Mosaic TPU
flash kernel, [B, S, H, D] in and out like ``_attention.attention``.

Splash attention keeps no [S, S] scores and skips the key blocks a causal mask hides
entirely. Compiled for a TPU by libtpu (deviceless compiles check it completely); run
anywhere else it takes Pallas's interpreter (tests on CPU).

A Mosaic kernel cannot be partitioned by XLA: under a mesh the caller runs it per shard
(``jax.shard_map`` over the batch and head axes; vesperjax/model/attention.py does).

Ragged batches: ``query_lengths`` / ``key_lengths`` become segment ids, positions before
a row's length in segment 0 and the rest in segment 1, so valid queries see only valid
keys; outputs at or past a query length are zeroed as in ``_attention``.
"""
import jax
import jax.numpy as jnp

BLOCKS = (512, 256, 128)  # the largest that divides S: fewer grid steps


def block_size(seq: int) -> int | None:
  """The kernel's block along the sequence for length `seq`, None where no TPU-legal
  block (a multiple of 128 lanes dividing S) exists."""
  return next((b for b in BLOCKS if seq % b == 0), None)


def applies(q, k, v) -> bool:
  """Self-attention of one head_dim whose length has a legal block."""
  return (q.shape[1] == k.shape[1] and block_size(q.shape[1]) is not None
          and q.shape[-1] == k.shape[-1] == v.shape[-1])


def _kernel(seq: int, heads: int, causal: bool, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  one = sa.CausalMask((seq, seq)) if causal else sa.FullMask((seq, seq))
  b = block_size(seq)
  blocks = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                         block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  # built per trace, not cached: its mask tables are jnp arrays of the trace that builds
  # them (a cached kernel would leak them into the next)
  return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=blocks,
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def _segments(lengths, b, s):
  if lengths is None:
    return jnp.zeros((b, s), jnp.int32)
  return (jnp.arange(s)[None, :] >= jnp.asarray(lengths, jnp.int32)[:, None]).astype(jnp.int32)


def attention_splash(q, k, v, causal=True, scale=None, *, query_lengths=None,
                     key_lengths=None, interpret=False):
  """softmax(q k^T * scale [+ causal mask]) v by the splash kernel; q, k, v [B, S, H, D]
  with S a multiple of 128 (`applies`)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top
  if not applies(q, k, v):
    raise ValueError(f"splash attention: self-attention with S a multiple of 128, got q "
                     f"{q.shape}, k {k.shape}")
  bsz, s, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  kernel = _kernel(s, h, bool(causal), bool(interpret))
  heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, S, D]: the kernel's layout
  qh = heads(q * jnp.asarray(scale, q.dtype))
  if query_lengths is None and key_lengths is None:
    out = jax.vmap(kernel)(qh, heads(k), heads(v))
  else:
    ids = sa.SegmentIds(q=_segments(query_lengths, bsz, s), kv=_segments(key_lengths, bsz, s))
    out = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(
        qh, heads(k), heads(v), ids)
  out = heads(out).astype(q.dtype)
  if query_lengths is None:
    return out
  keep = jnp.arange(s)[None, :] < jnp.asarray(query_lengths, jnp.int32)[:, None]
  return jnp.where(keep[:, :, None, None], out, 0).astype(q.dtype)
