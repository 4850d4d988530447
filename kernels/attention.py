"""Multi-head attention, layout [B, S, H, D] (as ``jax.nn.dot_product_attention``).

``attention(q, k, v, causal=True, implementation=None)`` picks one of:

* ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention``; CUDA GPU,
  fp16/bf16, head_dim a multiple of 8 and <= 128 (fused fwd+bwd, no [S, S] in memory).
* ``"pallas"``: the Pallas-Triton flash kernel that ships with JAX
  (``jax.experimental.pallas.ops.gpu.attention.mha``, custom_vjp fwd+bwd); needs S a
  multiple of its block; runs in interpret mode on CPU (tests only).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (any backend).
* ``"reference"``: naive softmax(q k^T / sqrt(D)) v in fp32, for tests.

``None`` / ``"auto"`` follows ``_choose``: cuDNN where it applies on a CUDA GPU, XLA
otherwise. The table is a default to be measured with ``kernels/bench.py`` on H100/H200.
The process default (``set_default_impl`` / ``VESPERJAX_KERNELS``) maps ``reference`` ->
"reference" and ``pallas`` -> "pallas".
"""
import jax
import jax.numpy as jnp

from . import _dispatch

IMPLEMENTATIONS = ("auto", "cudnn", "pallas", "xla", "reference")


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
  if jax.default_backend() == "cpu":
    # measured (2-core CPU, jax 0.10.2, tiny-preset layer [8, 256, 4, 64], fwd+bwd):
    # the plain einsum/softmax path 42 ms vs jax.nn.dot_product_attention's 60 ms
    return "reference"
  return "xla"


def attention(q, k, v, causal=True, implementation=None, *, scale=None, interpret=None):
  """softmax(q k^T * scale [+ causal mask]) v for [B, S, H, D] inputs."""
  impl = implementation or "auto"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    impl = _choose(q, k, v, interpret)
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
