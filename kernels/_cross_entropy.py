"""Linear + cross-entropy without the fp32 [N, V] logits: per-token loss and entropy.

``linear_cross_entropy(h, w, labels)`` returns ``loss[i] = lse_i - z_i[label_i]`` and the
predictive entropy ``H_i = lse_i - sum_j p_ij z_ij`` (nats) of ``softmax(z)``,
``z = h @ w.T``, accumulating over vocab chunks with an online logsumexp (and an online
``sum p z``). The backward (``jax.custom_vjp``) recomputes each logits chunk (or, on the
CPU where memory is cheap, reuses the forward's) and accumulates dh and dw; it is exact
for both outputs (entropy:
``dH/dz = -p (z - E_p[z])``), so the trainer may use entropy as a signal or a loss.

Conventions: ``labels < 0`` are ignored (loss 0, no loss gradient; entropy is still
computed). With ``valid_vocab`` set, ids >= valid_vocab (padding rows of w) get logit
-inf (probability 0, zero gradient). Matmuls accumulate in fp32 whatever the input dtype;
dh/dw come back in h/w's dtypes.

Paths (``impl``): "chunked" (pure JAX, scan over chunks: the portable default off GPU),
"pallas" (Pallas forward kernel on GPU / interpret mode, chunked backward),
"reference" (naive full logits, for tests), "auto" (``platform.CHOICES["cross_entropy"]``:
chunked everywhere until the Pallas forward is measured on a GPU).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from . import _dispatch
from . import platform

_NEG_INF = float("-inf")
# keep_logits=None keeps the chunked forward's fp32 logits for the backward (no second
# h @ w.T) on the CPU backend, up to this size; accelerators always recompute.
KEEP_LOGITS_MAX_BYTES = 256 << 20
MIN_BLOCK = 16  # the Pallas kernel's blocks: powers of two >= tl.dot's 16-wide tiles


def linear_cross_entropy_reference(h, w, labels, *, valid_vocab=None, precision=None,
                                   return_top1=False):
  """Naive: materialises the fp32 [N, V] logits."""
  z = jnp.dot(h, w.T, precision=precision, preferred_element_type=jnp.float32)
  v = w.shape[0]
  valid = jnp.arange(v) < (v if valid_vocab is None else valid_vocab)
  z = jnp.where(valid, z, _NEG_INF)
  lse = jax.nn.logsumexp(z, axis=-1)
  p = jnp.exp(z - lse[:, None])
  ez = jnp.sum(p * jnp.where(valid, z, 0.0), axis=-1)  # finite everywhere: no NaN grads
  zl = jnp.take_along_axis(z, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  loss = jnp.where(labels >= 0, lse - zl, 0.0)
  if return_top1:
    return loss, lse - ez, lax.stop_gradient(jnp.max(z, axis=-1) - lse)
  return loss, lse - ez


def _pad_to(x, n, axis=0):
  pad = -x.shape[axis] % n
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths)


def _chunk_masks(lc, v0, width, nvalid):
  """Which ids of the vocab chunk starting at v0 exist [1, BV], and which are labels."""
  ids = v0 + jnp.arange(width)
  return (ids < nvalid)[None, :], ids[None, :] == lc[:, None]


def _chunk_stats(hc, wc, lc, v0, nvalid, precision):
  """Logits chunk and its masks: z [BN, BV] fp32 with invalid ids at -inf."""
  z = lax.dot_general(hc, wc, (((1,), (1,)), ((), ())), precision=precision,
                      preferred_element_type=jnp.float32)
  valid, hit = _chunk_masks(lc, v0, wc.shape[0], nvalid)
  return jnp.where(valid, z, _NEG_INF), valid, hit


def _fwd_chunked(h, w, labels, nvalid, bn, bv, precision, keep_logits=False):
  """Returns per-token (lse, E_p[z], z_label, max z) over padded tokens, and with keep_logits
  the fp32 logits tiles [token chunks, vocab chunks, bn, bv] for the backward."""
  n, d = h.shape
  hp = _pad_to(h, bn).reshape(-1, bn, d)
  lp = _pad_to(labels, bn).reshape(-1, bn)
  wp = _pad_to(w, bv).reshape(-1, bv, d)
  starts = jnp.arange(wp.shape[0]) * bv

  def token_chunk(args):
    hc, lc = args

    def vocab_step(carry, xs):
      m, s, a, zl = carry
      wc, v0 = xs
      z, valid, hit = _chunk_stats(hc, wc, lc, v0, nvalid, precision)
      m1 = jnp.maximum(m, jnp.max(z, axis=1))
      scale = jnp.exp(m - m1)
      e = jnp.exp(z - m1[:, None])
      s = s * scale + jnp.sum(e, axis=1)
      a = a * scale + jnp.sum(jnp.where(valid, e * z, 0.0), axis=1)
      zl = zl + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
      return (m1, s, a, zl), (z if keep_logits else None)

    init = (jnp.full((bn,), _NEG_INF), jnp.zeros((bn,)), jnp.zeros((bn,)), jnp.zeros((bn,)))
    (m, s, a, zl), z = lax.scan(vocab_step, init, (wp, starts))
    return m + jnp.log(s), a / s, zl, m, z

  lse, ez, zl, zmax, z = lax.map(token_chunk, (hp, lp))
  return (lse.reshape(-1)[:n], ez.reshape(-1)[:n], zl.reshape(-1)[:n],
          zmax.reshape(-1)[:n], z)


def _bwd_chunked(h, w, labels, lse, ez, dloss, dent, nvalid, bn, bv, precision,
                 logits=None):
  """dz = dloss (p - onehot) - dent p (z - E_p z), contracted chunk by chunk; the logits
  tiles are recomputed unless the forward kept them."""
  n, d = h.shape
  v = w.shape[0]
  f32 = jnp.float32
  dloss = jnp.where(labels >= 0, dloss, 0.0)
  hp = _pad_to(h, bn).reshape(-1, bn, d)
  lp = _pad_to(labels, bn).reshape(-1, bn)
  per_tok = [_pad_to(x.astype(f32), bn).reshape(-1, bn) for x in (lse, ez, dloss, dent)]
  wp = _pad_to(w, bv).reshape(-1, bv, d)
  starts = jnp.arange(wp.shape[0]) * bv

  def vocab_step(dh, xs):
    wc, v0, zv = xs

    def token_step(dwc, ts):
      hc, lc, lse_c, ez_c, dl_c, de_c, zt = ts
      if zt is None:
        z, valid, hit = _chunk_stats(hc, wc, lc, v0, nvalid, precision)
      else:  # the forward's tile (invalid ids already at -inf)
        z, (valid, hit) = zt, _chunk_masks(lc, v0, wc.shape[0], nvalid)
      p = jnp.exp(z - lse_c[:, None])
      zc = jnp.where(valid, z - ez_c[:, None], 0.0)
      dz = dl_c[:, None] * (p - hit.astype(f32)) - de_c[:, None] * p * zc
      dz = dz.astype(jnp.promote_types(hc.dtype, wc.dtype))  # bf16 MXU/tensor-core inputs
      dhc = jnp.dot(dz, wc, precision=precision, preferred_element_type=f32)
      dwc = dwc + lax.dot_general(dz, hc, (((0,), (0,)), ((), ())), precision=precision,
                                  preferred_element_type=f32)
      return dwc, dhc

    dwc, dhc = lax.scan(token_step, jnp.zeros((bv, d), f32), (hp, lp, *per_tok, zv))
    return dh + dhc, dwc

  by_vocab = None if logits is None else jnp.swapaxes(logits, 0, 1)  # [vocab, token] chunks
  dh, dw = lax.scan(vocab_step, jnp.zeros(hp.shape, f32), (wp, starts, by_vocab))
  return dh.reshape(-1, d)[:n].astype(h.dtype), dw.reshape(-1, d)[:v].astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _lce(h, w, labels, nvalid, bn, bv, precision, use_pallas, interpret, keep_logits):
  out, _ = _lce_fwd(h, w, labels, nvalid, bn, bv, precision, use_pallas, interpret,
                    keep_logits)
  return out


def _lce_fwd(h, w, labels, nvalid, bn, bv, precision, use_pallas, interpret, keep_logits):
  z = None
  if use_pallas:
    lse, ez, zl, zmax = _fwd_pallas(h, w, labels, nvalid, bn, bv, precision, interpret)
  else:
    lse, ez, zl, zmax, z = _fwd_chunked(h, w, labels, nvalid, bn, bv, precision,
                                        keep_logits)
  loss = jnp.where(labels >= 0, lse - zl, 0.0)
  return (loss, lse - ez, zmax - lse), (h, w, labels, lse, ez, z)


def _lce_bwd(nvalid, bn, bv, precision, use_pallas, interpret, keep_logits, res, cts):
  del use_pallas, interpret, keep_logits
  h, w, labels, lse, ez, z = res
  dloss, dent, _ = cts  # top-1 log-prob: stop_gradient'ed by linear_cross_entropy
  dh, dw = _bwd_chunked(h, w, labels, lse, ez, dloss, dent, nvalid, bn, bv, precision, z)
  return dh, dw, np.zeros(labels.shape, jax.dtypes.float0)


_lce.defvjp(_lce_fwd, _lce_bwd)


def linear_cross_entropy(h, w, labels, *, valid_vocab=None, block_tokens=None,
                         block_vocab=None, precision=None, impl=None, interpret=None,
                         keep_logits=None, return_top1=False):
  """Per-token ``(loss [N], entropy [N])`` (fp32, nats) of ``softmax(h @ w.T)``.

  ``return_top1``: also return ``max_j log softmax(z)_j`` [N] (the log-probability of
  the top-1 guess, from the running max the online logsumexp keeps anyway), without
  gradient. ``loss <= -top1`` exactly when the label's logit is the largest.

  h: [N, D]; w: [V, D] (e.g. the tied embedding); labels: [N] int (< 0: ignored).
  Block sizes trade memory for speed: each step holds an fp32 [block_tokens,
  block_vocab] logits tile. They are positive integers; the Pallas kernel needs powers
  of two >= ``MIN_BLOCK``, and compiled for a GPU, a logits tile of at most 2^20
  elements and h/w tiles within ``_dispatch.SMEM_LIMIT_BYTES`` of shared memory (ValueError
  otherwise). ``impl``: "auto" | "pallas" | "chunked" | "reference".
  ``keep_logits`` (chunked forward): keep the fp32 logits tiles for the backward instead
  of recomputing them; None = when the target platform is CPU, up to ``KEEP_LOGITS_MAX_BYTES``.
  """
  if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[1] or labels.shape != h.shape[:1]:
    raise ValueError(f"bad shapes h{h.shape} w{w.shape} labels{labels.shape}")
  n, v = h.shape[0], w.shape[0]
  nvalid = v if valid_vocab is None else min(int(valid_vocab), v)
  impl = _dispatch.get_default_impl() if impl is None else impl
  if impl == "reference":
    return linear_cross_entropy_reference(h, w, labels, valid_vocab=valid_vocab,
                                          precision=precision, return_top1=return_top1)
  if impl == "auto" and not interpret:
    # CUDA stays on "chunked" (cuBLAS tiles with an XLA-fused epilogue; the Pallas
    # forward re-streams w per token block) until kernels/bench.py has measured both
    impl = platform.choice("cross_entropy")
  if impl == "chunked":
    use_pallas, interpret = False, False
  else:
    use_pallas, interpret = _dispatch.resolve(impl, interpret)
  _check_block("block_tokens", block_tokens, use_pallas)
  _check_block("block_vocab", block_vocab, use_pallas)
  if use_pallas and not interpret:
    bn_default, bv_default = 64, 128
  else:
    bn_default, bv_default = 1024, 2048
  bn = block_tokens or min(bn_default, _ceil_pow2(n))
  bv = block_vocab or min(bv_default, _ceil_pow2(v))
  if use_pallas and not interpret:
    _check_triton_tiles(bn, bv, h.shape[1], jnp.promote_types(h.dtype, w.dtype))
  if keep_logits is None:  # CPU: memory is cheap, the recomputing matmul is not
    padded = -(-n // bn) * bn * -(-v // bv) * bv
    keep_logits = (platform.choice("cross_entropy_keep_logits")
                   and padded * 4 <= KEEP_LOGITS_MAX_BYTES)
  keep_logits = bool(keep_logits) and not use_pallas
  loss, entropy, top1 = _lce(h, w, labels.astype(jnp.int32), nvalid, bn, bv, precision,
                             use_pallas, interpret, keep_logits)
  return (loss, entropy, lax.stop_gradient(top1)) if return_top1 else (loss, entropy)


def _ceil_pow2(x):
  return max(MIN_BLOCK, pl.next_power_of_2(int(x)))


def _check_block(name, value, pallas):
  """A user block size: a positive int; a power of two >= MIN_BLOCK for the kernel."""
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if pallas:
    _dispatch.check_block(name, value, minimum=MIN_BLOCK,
                          compiled=False)


def _k_block(d, interpret):
  """The kernel's D tile: 64 compiled (tensor-core K steps), all of D in interpret mode."""
  return min(64 if not interpret else 1 << 14, _ceil_pow2(d))


def pallas_smem_bytes(block_tokens, block_vocab, d, dtype):
  """Upper bound on the compiled forward kernel's shared memory: the h [bn, bk] and
  w [bv, bk] tiles (bk = the D tile), double-buffered (num_stages=2), and reduction
  scratch. Checked against XLA:GPU compiles for H100 and A100 (tests/kernels/test_pallas_gpu.py)."""
  bk, tiles = _k_block(d, False), block_tokens + block_vocab
  return 2 * tiles * bk * jnp.dtype(dtype).itemsize + 8 * tiles


def _check_triton_tiles(bn, bv, d, dtype):
  """ValueError unless the compiled kernel can hold these blocks: Triton's element limit
  on the fp32 [bn, bv] logits tile, its largest tensor (the h/w BlockSpecs only offset
  pointers; the kernel loads [bn or bv, 64] tiles), and the shared-memory estimate."""
  if bn * bv > _dispatch.TRITON_MAX_ELEMENTS:
    raise ValueError(f"block_tokens * block_vocab = {bn} * {bv} exceeds Triton's "
                     f"{_dispatch.TRITON_MAX_ELEMENTS}-element limit on the logits tile")
  smem = pallas_smem_bytes(bn, bv, d, dtype)
  if smem > _dispatch.SMEM_LIMIT_BYTES:
    raise ValueError(f"block_tokens={bn}, block_vocab={bv}: the kernel needs ~{smem} B of "
                     f"shared memory per block, over the {_dispatch.SMEM_LIMIT_BYTES} B of an H100/H200")


# ---------------------------------------------------------------- Pallas forward kernel


def _fwd_kernel(h_ref, w_ref, l_ref, lse_ref, ez_ref, zl_ref, zmax_ref, *, nvalid, bv, bk, nv, nk,
                precision):
  """One token block: loop over vocab blocks (and D blocks for the logits tile)."""
  bn = h_ref.shape[0]
  lab = l_ref[...]

  def vocab_body(j, carry):
    m, s, a, zl = carry

    def k_body(k, acc):
      hk = h_ref[:, pl.ds(k * bk, bk)]
      wk = w_ref[pl.ds(j * bv, bv), pl.ds(k * bk, bk)]
      return acc + lax.dot_general(hk, wk, (((1,), (1,)), ((), ())), precision=precision,
                                   preferred_element_type=jnp.float32)

    z = lax.fori_loop(0, nk, k_body, jnp.zeros((bn, bv), jnp.float32))
    ids = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    valid = ids < nvalid
    z = jnp.where(valid, z, _NEG_INF)
    m1 = jnp.maximum(m, jnp.max(z, axis=1))
    scale = jnp.exp(m - m1)
    e = jnp.exp(z - m1[:, None])
    s = s * scale + jnp.sum(e, axis=1)
    a = a * scale + jnp.sum(jnp.where(valid, e * z, 0.0), axis=1)
    zl = zl + jnp.sum(jnp.where(ids == lab[:, None], z, 0.0), axis=1)
    return m1, s, a, zl

  f32 = jnp.float32
  init = (jnp.full((bn,), _NEG_INF, f32), jnp.zeros((bn,), f32), jnp.zeros((bn,), f32),
          jnp.zeros((bn,), f32))
  m, s, a, zl = lax.fori_loop(0, nv, vocab_body, init)
  lse_ref[...] = m + jnp.log(s)
  ez_ref[...] = a / s
  zl_ref[...] = zl
  zmax_ref[...] = m


def _fwd_pallas(h, w, labels, nvalid, bn, bv, precision, interpret):
  """Grid over token blocks; each program streams all of w through an online lse.

  ``precision`` reaches the kernel's dot (Triton: fp32 HIGHEST -> IEEE, default -> TF32).
  """
  n, d = h.shape
  bk = _k_block(d, interpret)
  hp = _pad_to(_pad_to(h, bn), bk, axis=1)
  wp = _pad_to(_pad_to(w, bv), bk, axis=1)
  lp = _pad_to(labels, bn)
  npad, dpad = hp.shape
  nv, nk = wp.shape[0] // bv, dpad // bk
  kernel = functools.partial(_fwd_kernel, nvalid=nvalid, bv=bv, bk=bk, nv=nv, nk=nk,
                             precision=precision)
  tok = pl.BlockSpec((bn,), lambda i: (i,))
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = _dispatch.triton_params(num_warps=4, num_stages=2)
  out = pl.pallas_call(
      kernel,
      grid=(npad // bn,),
      in_specs=[pl.BlockSpec((bn, dpad), lambda i: (i, 0)),
                pl.BlockSpec(wp.shape, lambda i: (0, 0)), tok],
      out_specs=[tok, tok, tok, tok],
      out_shape=[jax.ShapeDtypeStruct((npad,), jnp.float32)] * 4,
      interpret=interpret,
      name="linear_cross_entropy_fwd",
      **kwargs,
  )(hp, wp, lp)
  return tuple(x[:n] for x in out)
