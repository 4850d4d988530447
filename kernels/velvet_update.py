"""Fused Velvet / AdamW update: one Pallas kernel over the whole parameter tree.

Multi-tensor apply: leaves are flattened into one 1-D bucket per (param dtype, grad
dtype), padded to the block size, updated by a single ``pallas_call`` that reads p, g, m,
v once and writes update, m, v once, then split back into the tree. Step-dependent
scalars (lr, b1, bias corrections) travel as a small fp32 array input, so a new step
never recompiles.

Per element (fp32 math; grads/params may be bf16)::

  m' = b1 m + (1 - b1) g;  v' = b2 v + (1 - b2) g^2
  update = -lr (m'/bc1 / (sqrt(v'/bc2) + eps) + wd p),  bc1 = 1 - b1^t, bc2 = 1 - b2^t
  skip_zero_grads and g == 0 exactly:  m' = m, v' = v, update = 0

Cost note: packing into buckets (concat) and splitting back each add a pass over the
data; callers that keep the moments as flat buckets (``pack`` / ``velvet_update_flat``)
save most of it. Whether the kernel beats XLA's per-leaf fusion of ``optax.adamw`` is for
``kernels/bench.py`` to measure on a GPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _dispatch

_NUM_SCALARS = 16  # padded to a power of two (Triton block shapes)
_GPU_BLOCK = 4096
_INTERPRET_MAX_BLOCK = 1 << 22


def _scalars(lr, b1, b2, eps, weight_decay, count):
  """In-graph step scalars (inputs, not constants: no recompiles per step).

  Computed as ``vesperjax.optim.velvet.velvet_update_reference`` does: hyperparameters are
  cast to fp32 first, so ``1 - b2`` is the fp32 difference (optax uses the float64 one:
  ~1e-5 relative apart in the v increment for b2 = 0.999).
  """
  f32 = jnp.float32
  lr, b1, b2, eps, weight_decay = (jnp.asarray(x, f32).reshape(())
                                   for x in (lr, b1, b2, eps, weight_decay))
  t = jnp.asarray(count).astype(f32).reshape(())
  vals = [lr, b1, 1 - b1, b2, 1 - b2, eps, weight_decay, 1 - b1 ** t, 1 - b2 ** t]
  return jnp.stack(vals + [jnp.zeros((), f32)] * (_NUM_SCALARS - len(vals)))


def _math(s, p, g, m, v, skip_zero_grads):
  """The element math on fp32 values; shared by kernel and reference (same op order)."""
  lr, b1, ob1, b2, ob2, eps, wd, bc1, bc2 = (s[i] for i in range(9))
  g = g.astype(jnp.float32)
  p = p.astype(jnp.float32)
  m1 = b1 * m + ob1 * g
  v1 = b2 * v + ob2 * (g * g)
  u = -lr * (wd * p + (m1 / bc1) / (jnp.sqrt(v1 / bc2) + eps))
  if skip_zero_grads:
    live = g != 0
    m1 = jnp.where(live, m1, m)
    v1 = jnp.where(live, v1, v)
    u = jnp.where(live, u, 0.0)
  return u, m1, v1


def _kernel(s_ref, p_ref, g_ref, m_ref, v_ref, u_ref, mo_ref, vo_ref, *, skip_zero_grads):
  s = [s_ref[i] for i in range(9)]
  u, m1, v1 = _math(s, p_ref[...], g_ref[...], m_ref[...], v_ref[...], skip_zero_grads)
  u_ref[...] = u.astype(u_ref.dtype)
  mo_ref[...] = m1
  vo_ref[...] = v1


def default_block_size(n, interpret):
  """Large blocks in interpret mode (each grid step costs a pass), 4096 on GPU."""
  if interpret:
    return min(pl.next_power_of_2(max(n, 128)), _INTERPRET_MAX_BLOCK)
  return _GPU_BLOCK


def velvet_update_flat(p, g, m, v, scalars, *, skip_zero_grads=False, block_size,
                       interpret=False):
  """The kernel on 1-D buckets whose length is a multiple of ``block_size``.

  Returns ``(update, m', v')``; update has p's dtype, moments are fp32. m and v are
  aliased to m' and v' (donate them to update in place).
  """
  n = p.shape[0]
  if n % block_size:
    raise ValueError(f"bucket length {n} is not a multiple of block_size {block_size}")
  blk = pl.BlockSpec((block_size,), lambda i: (i,))
  f32 = jnp.float32
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = _dispatch.triton_params(num_warps=8, num_stages=1)
  return pl.pallas_call(
      functools.partial(_kernel, skip_zero_grads=skip_zero_grads),
      grid=(n // block_size,),
      in_specs=[pl.BlockSpec((_NUM_SCALARS,), lambda i: (0,)), blk, blk, blk, blk],
      out_specs=[blk, blk, blk],
      out_shape=[jax.ShapeDtypeStruct((n,), p.dtype),
                 jax.ShapeDtypeStruct((n,), f32),
                 jax.ShapeDtypeStruct((n,), f32)],
      input_output_aliases={3: 1, 4: 2},
      interpret=interpret,
      name="velvet_update",
      **kwargs,
  )(scalars, p, g, m.astype(f32), v.astype(f32))


def _bucket_key(p, g):
  return (jnp.dtype(p.dtype).name, jnp.dtype(g.dtype).name)


def pack(leaves, keys, block_size_fn):
  """Concatenate 1-D views of ``leaves`` per bucket key, zero-padded to the block size.

  Returns ``{key: (flat, block_size)}`` and the per-leaf ``(key, offset, size, shape)``.
  """
  groups = {}
  layout = []
  for leaf, key in zip(leaves, keys):
    offset = sum(x.size for x in groups.get(key, []))
    groups.setdefault(key, []).append(leaf.reshape(-1))
    layout.append((key, offset, leaf.size, leaf.shape))
  buckets = {}
  for key, parts in groups.items():
    n = sum(x.size for x in parts)
    bs = block_size_fn(n)
    pad = -n % bs
    if pad:
      parts = parts + [jnp.zeros((pad,), parts[0].dtype)]
    buckets[key] = (jnp.concatenate(parts) if len(parts) > 1 else parts[0], bs)
  return buckets, layout


def unpack(flat_by_key, layout):
  """Inverse of ``pack`` (drops the padding)."""
  return [flat_by_key[key][off:off + size].reshape(shape)
          for key, off, size, shape in layout]


def velvet_update(params, grads, mu, nu, *, lr, b1, b2, eps, weight_decay, count,
                  skip_zero_grads=False, interpret=None, impl=None, block_size=None):
  """Fused Velvet/AdamW step on whole pytrees; returns ``(updates, new_mu, new_nu)``.

  ``grads`` are already clipped; ``lr``/``b1`` are the step's effective (possibly traced)
  scalars; ``count`` is the incremented int32 step (t >= 1). Updates follow optax's sign
  convention (add them to params) and have each param's dtype; moments are fp32.
  ``impl``: "auto" | "pallas" | "reference" (see ``_dispatch``).
  """
  use_pallas, interpret = _dispatch.resolve(impl, interpret)
  if not use_pallas:
    return velvet_update_reference_jnp(
        params, grads, mu, nu, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        count=count, skip_zero_grads=skip_zero_grads)
  p_leaves, treedef = jax.tree.flatten(params)
  g_leaves = treedef.flatten_up_to(grads)
  m_leaves = treedef.flatten_up_to(mu)
  v_leaves = treedef.flatten_up_to(nu)
  if not p_leaves:
    return params, mu, nu
  keys = [_bucket_key(p, g) for p, g in zip(p_leaves, g_leaves)]
  bs_fn = (lambda n: block_size) if block_size else (
      lambda n: default_block_size(n, interpret))
  f32 = jnp.float32
  pb, layout = pack(p_leaves, keys, bs_fn)
  gb, _ = pack(g_leaves, keys, bs_fn)
  mb, _ = pack([x.astype(f32) for x in m_leaves], keys, bs_fn)
  vb, _ = pack([x.astype(f32) for x in v_leaves], keys, bs_fn)
  s = _scalars(lr, b1, b2, eps, weight_decay, count)
  ub, mob, vob = {}, {}, {}
  for key, (pf, bs) in pb.items():
    ub[key], mob[key], vob[key] = velvet_update_flat(
        pf, gb[key][0], mb[key][0], vb[key][0], s, skip_zero_grads=skip_zero_grads,
        block_size=bs, interpret=interpret)
  return tuple(jax.tree.unflatten(treedef, unpack(b, layout)) for b in (ub, mob, vob))


def velvet_update_reference_jnp(params, grads, mu, nu, *, lr, b1, b2, eps, weight_decay,
                                count, skip_zero_grads=False, **unused):
  """Pure-JAX per-leaf reference (same math and op order as the kernel)."""
  del unused
  s = _scalars(lr, b1, b2, eps, weight_decay, count)

  def leaf(p, g, m, v):
    u, m1, v1 = _math(s, p, g, m.astype(jnp.float32), v.astype(jnp.float32),
                      skip_zero_grads)
    return u.astype(p.dtype), m1, v1

  out = jax.tree.map(leaf, params, grads, mu, nu)
  treedef = jax.tree.structure(params)
  return tuple(jax.tree.transpose(treedef, jax.tree.structure((0, 0, 0)), out))
