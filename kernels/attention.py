"""Multi-head attention, layout [B, S, H, D] (as ``jax.nn.dot_product_attention``).

``attention(q, k, v, causal=True, implementation=None)`` picks one of:

* ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention``; CUDA GPU,
  fp16/bf16, head_dim a multiple of 8 and <= 128 (fused fwd+bwd, no [S, S] in memory).
* ``"pallas"``: the Pallas-Triton flash kernel that ships with JAX
  (``jax.experimental.pallas.ops.gpu.attention.mha``, custom_vjp fwd+bwd); needs S a
  multiple of its block; runs in interpret mode on CPU (tests only).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (any backend).
* ``"blocked"``: causal attention by query blocks, each against only the keys it may
  see (about half the work of the full [S, S] at many blocks); einsum + softmax, for CPU.
* ``"reference"``: naive softmax(q k^T / sqrt(D)) v in fp32, for tests.

``None`` / ``"auto"`` follows ``_choose``: cuDNN where it applies on a CUDA GPU, blocked
for causal self-attention on CPU, XLA otherwise. The GPU entries are defaults to be
measured with ``kernels/bench.py`` on H100/H200.
The process default (``set_default_impl`` / ``VESPERJAX_KERNELS``) maps ``reference`` ->
"reference" and ``pallas`` -> "pallas".
"""
import jax
import jax.numpy as jnp

from . import _dispatch
from . import platform

IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla", "blocked", "reference")


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


def _pallas_block(s):
  for b in (128, 64, 32, 16):
    if s % b == 0:
      return b
  return None


def _choose(q, k, v, interpret):
  """The choice table (to be measured on GPU)."""
  default = _dispatch.get_default_impl()
  if default == "reference":
    return "reference"
  if default == "pallas" or interpret:
    return "pallas"
  if _dispatch.pallas_gpu_available() and cudnn_supported(q, k, v):
    return "cudnn"
  if platform.is_cpu():
    # measured (2-core CPU, jax 0.10.2, tiny-preset layer [8, 256, 4, 64], fwd+bwd):
    # blocked 15 ms, the plain einsum/softmax path 24 ms (42 before the host-memory fix),
    # jax.nn.dot_product_attention 60 ms
    return "blocked" if q.shape[1] == k.shape[1] and q.shape[1] > 64 else "reference"
  return "xla"


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
  sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
  bq, bk = _pallas_block(sq), _pallas_block(sk)
  if bq is None or bk is None or sq != sk:
    raise ValueError(f"pallas attention needs equal S divisible by 16, got {sq}, {sk}")
  blocks = pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=min(bq, 32),
                                       block_kv_dkv=min(bk, 32), block_q_dq=min(bq, 32),
                                       block_kv_dq=min(bk, 32))
  return pallas_attention.mha(q, k, v, None, sm_scale=d ** -0.5 if scale is None else scale,
                              causal=causal, block_sizes=blocks, interpret=interpret)
