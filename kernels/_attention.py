"""Multi-head attention, layout [B, S, H, D] (as ``jax.nn.dot_product_attention``).

``attention(q, k, v, causal=True, implementation=None)`` picks one of:

* ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention``; CUDA GPU,
  fp16/bf16, head_dim a multiple of 8 and <= 128 (fused fwd+bwd, no [S, S] in memory).
* ``"pallas"``: the Pallas-Triton flash kernel that ships with JAX
  (``jax.experimental.pallas.ops.gpu.attention.mha``, custom_vjp fwd+bwd); needs equal
  S, a multiple of 16; its blocks shrink until their shared memory fits
  ``SMEM_LIMIT_BYTES`` (ValueError when none do); interpret mode on CPU (tests only).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (any backend).
* ``"blocked"``: causal attention by query blocks, each against only the keys it may
  see (about half the work of the full [S, S] at many blocks); einsum + softmax, for CPU.
* ``"reference"``: naive softmax(q k^T / sqrt(D)) v in fp32, for tests.

``None`` / ``"auto"`` follows ``_choose`` and its row of ``platform.CHOICES``: cuDNN
where it applies on a CUDA GPU, blocked for causal self-attention on CPU, XLA otherwise;
Pallas (process default) only where ``pallas_supported``. The GPU entries are defaults
to be measured with ``kernels/bench.py`` on H100/H200.
The process default (``set_default_impl`` / ``VESPERJAX_KERNELS``) maps ``reference`` ->
"reference" and ``pallas`` -> "pallas".
"""
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _dispatch
from . import platform

IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla", "blocked", "reference")
# Shared memory per block the Pallas kernel may use (the compile target is unknown while
# tracing: sm_90's limit, see _dispatch).
SMEM_LIMIT_BYTES = _dispatch.SMEM_LIMIT_BYTES
_PALLAS_BLOCKS = (128, 64, 32, 16)
_PALLAS_BWD_MAX_BLOCK = 32  # mma.sync sizes, where pallas_bwd_smem_bytes holds


def attention_reference(q, k, v, causal=True, scale=None):
  """Naive attention with fp32 softmax; [B, S, H, D] in, q's dtype out."""
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    sq, sk = q.shape[1], k.shape[1]
    mask = jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :]
    s = jnp.where(mask, s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(q.dtype)


def attention_blocked(q, k, v, scale=None, block=None):
  """Causal self-attention (S_q == S_k) as query blocks against their key prefixes.

  Block i's queries see keys [0, (i + 1) * block) only, so the masked upper triangle is
  mostly never computed: at S=256 in blocks of 64, 10 of 16 score tiles instead of 16.
  Same fp32 math as the reference otherwise. Blocks are unrolled (static shapes).
  """
  sq, d = q.shape[1], q.shape[-1]
  if k.shape[1] != sq:
    raise ValueError(f"blocked attention is self-attention: S_q {sq} != S_k {k.shape[1]}")
  scale = d ** -0.5 if scale is None else scale
  block = block or max(64, -(-sq // 8 // 64) * 64)  # at most ~8 blocks: compile time
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, S, D]
  outs = []
  for start in range(0, sq, block):
    stop = min(start + block, sq)
    s = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop], k[:, :, :stop],
                   preferred_element_type=jnp.float32) * scale
    mask = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    outs.append(jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v[:, :, :stop],
                           preferred_element_type=jnp.float32))
  return jnp.swapaxes(jnp.concatenate(outs, axis=2), 1, 2).astype(q.dtype)


def cudnn_supported(q, k, v):
  """Shapes/dtypes cuDNN flash attention accepts (conservative)."""
  d = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype
          and d % 8 == 0 and d <= 128 and k.shape[-1] == v.shape[-1] == d)


def pallas_smem_bytes(block_q, block_k, head_dim, dtype):
  """Upper bound on the shared memory of JAX's Pallas flash forward (``mha``, 2 stages).

  The q tile [block_q, D'] (D' = head_dim padded to a power of two), the K and V tiles
  [block_k, D'] double-buffered plus, on sm_90, one more each for the async wgmma, and a
  [block_q, block_k] tile staged for the second matmul on sm_80. Checked against XLA:GPU
  compiles for H200 and A100 (tests/test_kernels_gpu.py).
  """
  dp, size = pl.next_power_of_2(head_dim), jnp.dtype(dtype).itemsize
  return (block_q + 4 * block_k) * dp * size + block_q * block_k * size


def pallas_bwd_smem_bytes(block, head_dim, dtype):
  """Upper bound on the fused backward kernel's shared memory, all four of its blocks
  equal to `block` (<= 32: larger ones take wgmma paths this does not bound): four
  [block, D'] tiles, a [block, block] tile and scratch; checked like the forward."""
  dp, size = pl.next_power_of_2(head_dim), jnp.dtype(dtype).itemsize
  return (4 * block * dp + block * block) * size + 8 * block


def pallas_block_sizes(seq_len, head_dim, dtype, limit=None):
  """``mha`` blocks for this S / head_dim / dtype whose estimates fit `limit` bytes
  (default ``SMEM_LIMIT_BYTES``).

  Forward: among 128/64/32/16 dividing S, the largest block_q x block_k tile, then the
  squarest, then the tallest; backward: the largest block <= 32. ValueError (one line)
  when S is not a multiple of 16 or nothing fits.
  """
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # pylint: disable=g-import-not-at-top
  limit = SMEM_LIMIT_BYTES if limit is None else limit
  sizes = [b for b in _PALLAS_BLOCKS if seq_len % b == 0]
  if not sizes:
    raise ValueError(f"pallas attention needs S divisible by 16, got {seq_len}")
  fwd = [(bq, bk) for bq in sizes for bk in sizes
         if pallas_smem_bytes(bq, bk, head_dim, dtype) <= limit]
  bwd = [b for b in sizes
         if b <= _PALLAS_BWD_MAX_BLOCK and pallas_bwd_smem_bytes(b, head_dim, dtype) <= limit]
  if not fwd or not bwd:
    raise ValueError(f"pallas attention: head_dim {head_dim} ({jnp.dtype(dtype).name}) needs "
                     f"more than {limit} B of shared memory per block even with "
                     f"{sizes[-1]}-wide blocks; use implementation='xla'")
  bq, bk = min(fwd, key=lambda b: (-b[0] * b[1], abs(math.log2(b[0] / b[1])), -b[0]))
  return pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bwd[0],
                                     block_kv_dkv=bwd[0], block_q_dq=bwd[0],
                                     block_kv_dq=bwd[0])


def _pallas_blocks(q, k, v, interpret):
  """The Pallas kernel's blocks for these inputs (no shared-memory limit in interpret
  mode); ValueError where it cannot run them."""
  sq, d = q.shape[1], q.shape[-1]
  if k.shape[1] != sq or k.shape[-1] != d or v.shape[-1] != d:
    raise ValueError(f"pallas attention needs equal S and head_dim, got q{q.shape} "
                     f"k{k.shape} v{v.shape}")
  return pallas_block_sizes(sq, d, q.dtype, math.inf if interpret else None)


def pallas_supported(q, k, v, interpret=None):
  """Whether the Pallas kernel can run (and, compiled, fit) these inputs."""
  try:
    _pallas_blocks(q, k, v, _dispatch.resolve("pallas", interpret)[1])
  except ValueError:
    return False
  return True


def _applies(impl, q, k, v):
  """Whether "auto" may pick `impl` for these inputs: cuDNN within its limits, blocked
  for self-attention longer than one block (shorter ones have nothing to skip)."""
  if impl == "cudnn":
    return cudnn_supported(q, k, v)
  if impl == "blocked":
    return q.shape[1] == k.shape[1] and q.shape[1] > 64
  return True


def _choose(q, k, v, interpret):
  """What "auto" runs: the process default's kernel where it can, else the first
  implementation of ``platform.CHOICES["attention"]`` that applies."""
  default = _dispatch.get_default_impl()
  if default == "reference":
    return "reference"
  if (default == "pallas" or interpret) and pallas_supported(q, k, v, interpret):
    return "pallas"
  return next(impl for impl in platform.choice("attention") if _applies(impl, q, k, v))


def attention(q, k, v, causal=True, implementation=None, *, scale=None, interpret=None):
  """softmax(q k^T * scale [+ causal mask]) v for [B, S, H, D] inputs."""
  impl = implementation or "auto"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    impl = _choose(q, k, v, interpret)
  if impl == "blocked" and not causal:
    impl = "reference"  # nothing to skip
  if impl == "blocked":
    return attention_blocked(q, k, v, scale=scale)
  if impl == "reference":
    return attention_reference(q, k, v, causal=causal, scale=scale)
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        implementation=impl)
  # pallas
  from jax.experimental.pallas.ops.gpu import attention as pallas_attention  # pylint: disable=g-import-not-at-top
  _, interpret = _dispatch.resolve("pallas", interpret)
  blocks = _pallas_blocks(q, k, v, interpret)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return pallas_attention.mha(q, k, v, None, sm_scale=scale, causal=causal,
                              block_sizes=blocks, interpret=interpret)
