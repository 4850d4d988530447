"""Multi-head attention, layout [B, S, H, D] (as ``jax.nn.dot_product_attention``).

``attention(q, k, v, causal=True, implementation=None)`` picks one of:

* ``"cudnn"``: cuDNN flash attention via ``jax.nn.dot_product_attention``; CUDA GPU,
  fp16/bf16, head_dim a multiple of 8 and <= 128 (fused fwd+bwd, no [S, S] in memory).
* ``"tokamax"``: ``tokamax.dot_product_attention`` (the ``gpu`` extra), which runs the
  first of ``TOKAMAX_ORDER`` that accepts the inputs: its Mosaic GPU flash kernel
  (Hopper and Blackwell, fp16/bf16), its Pallas-Triton flash kernel (Ampere and later,
  fp32 too), cuDNN, then XLA (any backend: the CPU path the tests check). Traced for
  CUDA on a host without a GPU (a deviceless compile), tokamax's hardware checks are off
  (``cross_compile``) so its Triton kernel lowers; its Mosaic kernel asks the host's
  device for sm_90 and is skipped there.
* ``"splash"``: jax's splash attention (``_splash_attention.py``), a Mosaic TPU flash
  kernel; S a multiple of 128; interpreted off TPU. Under a mesh it runs per shard
  (``platform.PER_SHARD_ATTENTION``).
* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` (any backend).
* ``"blocked"``: causal attention by query blocks, each against only the keys it may
  see (about half the work of the full [S, S] at many blocks); einsum + softmax, for CPU.
* ``"reference"``: naive softmax(q k^T / sqrt(D)) v in fp32, for tests.

``query_lengths`` / ``key_lengths`` ([B] ints, optional) make a batch ragged: keys at or
past a row's key length are masked, and outputs at or past its query length are zero.

``None`` / ``"auto"`` follows ``_choose`` and its row of ``platform.CHOICES``: cuDNN
where it applies on a CUDA GPU, then tokamax where it is installed, blocked for causal
self-attention on CPU, XLA otherwise. The GPU entries are defaults to be measured with
``benchmarks/gpu_acceptance.py`` on H100/H200. The process default
(``set_default_impl`` / ``VESPERJAX_KERNELS``) maps ``reference`` -> "reference" and
``pallas`` (run the kernels) -> "tokamax" where it is installed.
"""
import importlib.util

import jax
import jax.numpy as jnp

from . import _dispatch
from . import _splash_attention as splash
from . import platform

IMPLEMENTATIONS = ("auto", "cudnn", "tokamax", "splash", "xla", "blocked", "reference")
PER_SHARD = platform.PER_SHARD_ATTENTION
# tokamax's candidates in order; it runs the first that does not raise NotImplementedError
TOKAMAX_ORDER = ("mosaic", "triton", "cudnn", "xla")


def _length_mask(b, sq, sk, query_lengths, key_lengths):
  """[B, 1, Sq, Sk] True where a query row and key column lie within their lengths."""
  q_ok = (jnp.ones((b, sq), bool) if query_lengths is None
          else jnp.arange(sq)[None, :] < jnp.asarray(query_lengths)[:, None])
  k_ok = (jnp.ones((b, sk), bool) if key_lengths is None
          else jnp.arange(sk)[None, :] < jnp.asarray(key_lengths)[:, None])
  return (q_ok[:, :, None] & k_ok[:, None, :])[:, None]


def _int32(lengths):
  return None if lengths is None else jnp.asarray(lengths, jnp.int32)


def _zero_past_query_lengths(out, query_lengths):
  """Outputs at or past each row's query length set to zero (their gradient too)."""
  if query_lengths is None:
    return out
  keep = jnp.arange(out.shape[1])[None, :] < jnp.asarray(query_lengths)[:, None]
  return jnp.where(keep[:, :, None, None], out, jnp.zeros((), out.dtype))


def attention_reference(q, k, v, causal=True, scale=None, *, query_lengths=None,
                        key_lengths=None):
  """Naive attention with fp32 softmax; [B, S, H, D] in, q's dtype out.

  ``query_lengths`` / ``key_lengths``: see the module docstring (rows with no key left
  come out as zero).
  """
  d = q.shape[-1]
  scale = d ** -0.5 if scale is None else scale
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  sq, sk = q.shape[1], k.shape[1]
  mask = jnp.ones((1, 1, sq, sk), bool)
  if causal:
    mask = mask & (jnp.arange(sq)[:, None] + (sk - sq) >= jnp.arange(sk)[None, :])
  if query_lengths is not None or key_lengths is not None:
    mask = mask & _length_mask(q.shape[0], sq, sk, query_lengths, key_lengths)
  # a finite floor, not -inf: a row with no key left must not turn into NaNs (its
  # output is zeroed below)
  p = jax.nn.softmax(jnp.where(mask, s, jnp.finfo(jnp.float32).min), axis=-1)
  p = jnp.where(jnp.any(mask, axis=-1, keepdims=True), p, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return _zero_past_query_lengths(out, query_lengths)


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



def tokamax_available():
  """Whether tokamax (the ``gpu`` extra) is installed; nothing is imported."""
  return importlib.util.find_spec("tokamax") is not None


def _import_tokamax():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError:  # a ValueError: the CLIs report bad input as one `error:` line
    raise ValueError("attention implementation 'tokamax' needs tokamax: "
                     "pip install 'vesperjax[gpu]'") from None
  return tokamax


def _host_has_gpu():
  return jax.devices()[0].platform == "gpu"


def _cross_compiled(tokamax, fn):
  """`fn(q, k, v, *lengths)` with tokamax's hardware checks off while its forward and
  its backward are traced: tokamax checks the host's device again when jax traces the
  backward, after the forward has returned, so the backward is traced here too (the
  checks stay on for every other trace, tokamax's other ops included)."""
  checks_off = lambda: tokamax.config.cross_compile(True)

  @jax.custom_vjp
  def run(q, k, v, *lengths):
    with checks_off():
      return fn(q, k, v, *lengths)

  def run_fwd(q, k, v, *lengths):
    with checks_off():
      return jax.vjp(lambda q, k, v: fn(q, k, v, *lengths), q, k, v)

  def run_bwd(backward, d_out):
    with checks_off():
      return (*backward(d_out), None, None)

  run.defvjp(run_fwd, run_bwd)
  return run


def attention_tokamax(q, k, v, causal=True, scale=None, *, query_lengths=None,
                      key_lengths=None, order=TOKAMAX_ORDER):
  """``tokamax.dot_product_attention`` trying the implementations of `order` in turn.

  Traced for CUDA on a host without a GPU, tokamax's hardware checks are turned off so
  that its Triton kernel (not XLA) lowers into the program.
  """
  tokamax = _import_tokamax()
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # tokamax parses sys.argv (a CLI's or pytest's) otherwise

  def fn(q, k, v, q_lengths, k_lengths):
    return tokamax.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, query_seq_lengths=q_lengths,
        key_value_seq_lengths=k_lengths, implementation=tuple(order))

  if platform.current() == "cuda" and not _host_has_gpu():
    fn = _cross_compiled(tokamax, fn)
  out = fn(q, k, v, _int32(query_lengths), _int32(key_lengths))
  return _zero_past_query_lengths(out, query_lengths)


def _applies(impl, q, k, v):
  """Whether "auto" may pick `impl` for these inputs: cuDNN within its limits, tokamax
  where installed, blocked for self-attention longer than one block (shorter ones have
  nothing to skip)."""
  if impl == "cudnn":
    return cudnn_supported(q, k, v)
  if impl == "tokamax":
    return tokamax_available()
  if impl == "splash":
    return splash.applies(q, k, v)
  if impl == "blocked":
    return q.shape[1] == k.shape[1] and q.shape[1] > 64
  return True


def _choose(q, k, v, interpret=None):
  """What "auto" runs: "reference" or tokamax for those process defaults, else the first
  implementation of ``platform.CHOICES["attention"]`` that applies. (`interpret` is
  accepted for the other kernels' signature; no attention path interprets.)"""
  del interpret
  default = _dispatch.get_default_impl()
  if default == "reference":
    return "reference"
  if default == "pallas" and tokamax_available():
    return "tokamax"
  return next(impl for impl in platform.choice("attention") if _applies(impl, q, k, v))


def attention_implementation(q, k, v, implementation=None, *, causal=True, ragged=False):
  """The implementation `attention` runs for these inputs: "auto" resolved (`_choose`),
  blocked read as the reference where it has nothing to skip or lengths to honour."""
  impl = implementation or "auto"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
  if impl == "auto":
    impl = _choose(q, k, v)
  if impl == "blocked" and (not causal or ragged):
    impl = "reference"  # nothing to skip / no lengths
  return impl


def attention(q, k, v, causal=True, implementation=None, *, scale=None, query_lengths=None,
              key_lengths=None, tokamax_order=TOKAMAX_ORDER):
  """softmax(q k^T * scale [+ causal mask]) v for [B, S, H, D] inputs.

  ``implementation``: one of IMPLEMENTATIONS (None: "auto"). ``query_lengths`` /
  ``key_lengths``: [B] valid lengths (module docstring). ``tokamax_order``: the
  implementations tokamax tries, first that applies (default ``TOKAMAX_ORDER``).
  """
  ragged = query_lengths is not None or key_lengths is not None
  impl = attention_implementation(q, k, v, implementation, causal=causal, ragged=ragged)
  lengths = dict(query_lengths=query_lengths, key_lengths=key_lengths)
  if impl == "blocked":
    return attention_blocked(q, k, v, scale=scale)
  if impl == "reference":
    return attention_reference(q, k, v, causal=causal, scale=scale, **lengths)
  if impl == "tokamax":
    return attention_tokamax(q, k, v, causal, scale, order=tokamax_order, **lengths)
  if impl == "splash":
    return splash.attention_splash(q, k, v, causal, scale, interpret=platform.current() != "tpu",
                                   **lengths)
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=causal, query_seq_lengths=_int32(query_lengths),
      key_value_seq_lengths=_int32(key_lengths), implementation=impl)
  return _zero_past_query_lengths(out, query_lengths)
