"""Fused Velvet / AdamW update: one Pallas kernel launch per bucket of many leaves.

Multi-tensor apply: the leaves' p, g, m and v are flattened into fp32 1-D buckets (the
leaves' views concatenated, padded to the block size), each updated by one
``pallas_call`` that reads p, g, m, v once and writes update, m', v' over p, m, v in
place; the buckets are then split back into the tree. Step-dependent scalars (lr, b1,
bias corrections) travel as a small fp32 array input, so a new step never recompiles.

Per element the kernel body calls ``vesperjax.optim.velvet_math.velvet_element``, the one
definition of Velvet's math (its module docstring has the equations), on fp32 blocks
(grads/params may be bf16; the buckets are fp32). The pure-JAX path is the optimizer's
``velvet_update_reference``, on the same function.

Memory: the packed copies are temporaries on top of what XLA's per-leaf update needs.
Buckets hold at most ``max_chunk`` elements (cut between leaves; a larger leaf gets a
bucket of its own), and the p, m, v buckets' padding repeats a gradient element, so XLA
builds them once the gradients exist rather than early, while the backward pass's
activations are still live.

Sharded params: XLA cannot partition a ``pallas_call``, so on sharded operands it would
gather every leaf onto every device. Given the params' shardings (``shardings=``),
``velvet_update`` runs pack -> kernel -> unpack under ``jax.shard_map`` instead: each
device packs and updates only its own shards.

Backends (``impl=``): ``"triton"`` is this module's Pallas Triton kernel;
``"mosaic"`` the Pallas Mosaic GPU kernel of ``_velvet_mosaic.py`` (sm_90+; same buckets,
scalars and element math); ``"tpu"`` the Pallas Mosaic TPU kernel of ``_velvet_tpu.py``;
``"pallas"`` and ``"auto"`` take the first that applies of
``platform.CHOICES["velvet_kernel"]`` (``choose_kernel``).

Cost note: packing into buckets and splitting back each add a pass over the data.
Whether the kernel beats XLA's per-leaf fusion of ``optax.adamw`` is for
``kernels/bench.py`` to measure on a GPU.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import NamedSharding, PartitionSpec as P

from vesperjax.optim.velvet_math import bias_corrections, velvet_element, velvet_update_reference

from . import _dispatch, platform

KERNELS = ("triton", "mosaic", "tpu")
IMPLS = _dispatch.IMPLS + KERNELS

_NUM_SCALARS = 8  # padded to a power of two (Triton block shapes)
_GPU_BLOCK = 4096
_INTERPRET_MAX_BLOCK = 1 << 22
_MIN_BLOCK = 128
MAX_CHUNK = 1 << 20  # elements per bucket (bounds the packed copies' memory)


def _scalars(lr, b1, b2, eps, weight_decay, count, bc1=None):
  """In-graph step scalars ``lr, b1, b2, eps, wd, 1 - b1^t, 1 - b2^t`` (inputs, not
  constants: no recompiles per step).

  fp32 as the reference path has them: hyperparameters are cast first, so ``1 - b2`` is
  the fp32 difference (optax uses the float64 one: ~1e-5 relative apart in the v
  increment for b2 = 0.999). ``bc1`` replaces ``1 - b1^t`` when given (the "product"
  bias correction).
  """
  f32 = jnp.float32
  lr, b1, b2, eps, weight_decay = (jnp.asarray(x, f32).reshape(())
                                   for x in (lr, b1, b2, eps, weight_decay))
  t = jnp.asarray(count).astype(f32).reshape(())
  step_bc1, bc2 = bias_corrections(b1, b2, t)
  bc1 = step_bc1 if bc1 is None else jnp.asarray(bc1, f32).reshape(())
  vals = [lr, b1, b2, eps, weight_decay, bc1, bc2]
  return jnp.stack(vals + [jnp.zeros((), f32)] * (_NUM_SCALARS - len(vals)))


def _kernel(s_ref, p_ref, g_ref, m_ref, v_ref, u_ref, mo_ref, vo_ref, *, skip_zero_grads):
  lr, b1, b2, eps, wd, bc1, bc2 = (s_ref[i] for i in range(7))
  u, m1, v1 = velvet_element(p_ref[...], g_ref[...], m_ref[...], v_ref[...], lr=lr,
                             b1=b1, b2=b2, eps=eps, weight_decay=wd, bc1=bc1, bc2=bc2,
                             skip_zero_grads=skip_zero_grads)
  u_ref[...] = u.astype(u_ref.dtype)
  mo_ref[...] = m1
  vo_ref[...] = v1


def default_block_size(n, interpret, kernel="triton"):
  """Large blocks in interpret mode (each grid step costs a pass), 4096 on GPU; Mosaic
  GPU's blocks stay within its TMA limit (``_velvet_mosaic.MAX_BLOCK_SIZE``)."""
  if kernel == "tpu":
    return _velvet_tpu().default_block_size(n, interpret)
  if interpret:
    size = min(pl.next_power_of_2(max(n, 128)), _INTERPRET_MAX_BLOCK)
    return min(size, _velvet_mosaic().MAX_BLOCK_SIZE) if kernel == "mosaic" else size
  return _velvet_mosaic().DEFAULT_BLOCK_SIZE if kernel == "mosaic" else _GPU_BLOCK


def check_block_size(block_size, *, compiled):
  """ValueError unless ``block_size`` is a power of two >= 128 (<= 2^20 when ``compiled``
  for a GPU, Triton's per-block limit)."""
  _dispatch.check_block("velvet_update: block_size", block_size, minimum=_MIN_BLOCK,
                        compiled=compiled)


def velvet_update_flat(p, g, m, v, scalars, *, skip_zero_grads=False, block_size,
                       interpret=False):
  """The kernel on 1-D buckets whose length is a multiple of ``block_size``.

  Returns ``(update, m', v')``; update has p's dtype, moments are fp32. p, m and v are
  aliased to update, m' and v' (donate them to update in place).
  """
  check_block_size(block_size, compiled=not interpret)
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
      input_output_aliases={1: 0, 3: 1, 4: 2},
      interpret=interpret,
      name="velvet_update",
      **kwargs,
  )(scalars, p, g, m.astype(f32), v.astype(f32))


def chunk_layout(sizes, max_chunk=MAX_CHUNK):
  """Cut leaves of ``sizes`` (between leaves) into buckets of at most ``max_chunk``
  elements (None: one bucket; a larger leaf gets a bucket of its own). Returns each
  bucket's leaf indices and each leaf's ``(bucket, offset, size)``."""
  chunks, layout, n = [], [], 0
  for i, size in enumerate(sizes):
    if not chunks or (max_chunk and n and n + size > max_chunk):
      chunks.append([])
      n = 0
    layout.append((len(chunks) - 1, n, size))
    chunks[-1].append(i)
    n += size
  return chunks, layout


def pack(leaves, idx, length):
  """fp32 1-D buckets ``(p, g, m, v)`` of ``length`` from ``leaves`` (four lists) at ``idx``.

  Padding is zeros for g; for p, m and v it repeats the bucket's last gradient element:
  that dependence makes XLA build them once the gradients exist, not early (they need
  no gradient otherwise) while the backward pass's activations are still live.
  """
  f32 = jnp.float32
  n = sum(leaves[0][i].size for i in idx)
  g = [leaves[1][i].reshape(-1).astype(f32) for i in idx]
  last = next((x[-1] for x in reversed(g) if x.size), jnp.zeros((), f32))
  out = []
  for r, row in enumerate(leaves):
    parts = g if r == 1 else [row[i].reshape(-1).astype(f32) for i in idx]
    if length > n:
      parts = parts + [jnp.full((length - n,), 0.0 if r == 1 else last, f32)]
    out.append(jnp.concatenate(parts) if len(parts) > 1 else parts[0])
  return out


def unpack(rows, layout, shapes):
  """Per-leaf arrays from 1-D rows (one per bucket); inverse of ``pack``."""
  return [rows[b][off:off + size].reshape(shape)
          for (b, off, size), shape in zip(layout, shapes)]


def _shard_specs(shardings, treedef):
  """(mesh, per-leaf PartitionSpecs) from ``shardings``; None for no / one-device mesh."""
  if shardings is None:
    return None
  leaves = treedef.flatten_up_to(shardings)
  bad = [s for s in leaves if not isinstance(s, NamedSharding)]
  if bad:
    raise TypeError("velvet_update: shardings= must hold a NamedSharding per leaf, got "
                    f"{type(bad[0]).__name__}")
  meshes = {s.mesh for s in leaves}
  if len(meshes) > 1:
    raise ValueError("velvet_update: shardings= span several meshes")
  mesh = meshes.pop() if meshes else None
  if mesh is None or mesh.size == 1:
    return None
  return mesh, [s.spec for s in leaves]


def kernel_applies(kernel):
  """Whether ``kernel`` ("triton" | "mosaic") can run here: Triton while jax ships
  Pallas's Triton backend; Mosaic GPU on compute capability >= 9.0 (a local GPU's; when
  tracing for CUDA without one, sm_90 is assumed, as Pallas itself does)."""
  try:
    if kernel == "triton":
      from jax.experimental.pallas import triton as _  # pylint: disable=g-import-not-at-top
      return True
    if kernel == "tpu":  # compiled by libtpu for a TPU target, interpreted elsewhere
      from jax.experimental.pallas import tpu as _  # pylint: disable=g-import-not-at-top,reimported
      return True
    from jax.experimental.pallas import mosaic_gpu as _  # pylint: disable=g-import-not-at-top,reimported
  except ImportError:
    return False
  device = jax.devices()[0]
  capability = getattr(device, "compute_capability", None)
  if device.platform != "gpu" or capability is None:
    return True
  return float(capability) >= 9.0


def choose_kernel(impl=None, interpret=None):
  """Returns ``(kernel, interpret)``: kernel is "triton", "mosaic", "tpu" or None (the
  pure-JAX path). ``impl`` is one of IMPLS (None: the process default, ``_dispatch``); "pallas"
  and "auto" take the first of ``platform.CHOICES["velvet_kernel"]`` that applies."""
  impl = _dispatch.get_default_impl() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"velvet_update: impl must be one of {IMPLS}, got {impl!r}")
  on_tpu = platform.current() == "tpu"
  if impl == "tpu" or (impl in ("auto", "pallas")
                       and platform.choice("velvet_kernel")[:1] == ("tpu",)):
    # Mosaic TPU compiles for a TPU target itself (the "pallas" row is about the GPU
    # kernels); anywhere else it runs in the TPU interpreter
    return "tpu", (not on_tpu) if interpret is None else bool(interpret)
  if impl in KERNELS:
    interpret = _dispatch.resolve("pallas", interpret)[1]
    if not interpret and not kernel_applies(impl):
      raise ValueError(f"velvet_update: impl={impl!r} does not run on this jax / GPU "
                       "(Mosaic GPU needs compute capability 9.0)")
    return impl, interpret
  use_kernel, interpret = _dispatch.resolve(impl, interpret)
  if not use_kernel:
    return None, interpret
  options = platform.choice("velvet_kernel")
  kernel = next((k for k in options if kernel_applies(k)), None)
  if kernel is None and impl == "pallas":
    raise ValueError(f"velvet_update: none of the kernels {options} runs on this "
                     "jax / GPU; use impl='reference'")
  return kernel, interpret


def _check_block_size(kernel, block_size, *, compiled):
  if kernel == "mosaic":
    _velvet_mosaic().check_block_size(block_size, compiled=compiled)
  elif kernel == "tpu":
    _velvet_tpu().check_block_size(block_size, compiled=compiled)
  else:
    check_block_size(block_size, compiled=compiled)


def _velvet_mosaic():
  from . import _velvet_mosaic  # pylint: disable=g-import-not-at-top
  return _velvet_mosaic


def _velvet_tpu():
  from . import _velvet_tpu  # pylint: disable=g-import-not-at-top
  return _velvet_tpu


def _update_leaves(p_leaves, g_leaves, m_leaves, v_leaves, s, *, skip_zero_grads,
                   block_size, interpret, max_chunk, kernel="triton"):
  """pack -> one kernel call per bucket -> unpack, on lists of leaves."""
  chunks, layout = chunk_layout([p.size for p in p_leaves], max_chunk)
  leaves = (p_leaves, g_leaves, m_leaves, v_leaves)
  flat = velvet_update_flat
  if kernel == "mosaic":
    flat = _velvet_mosaic().velvet_update_flat
  elif kernel == "tpu":
    flat = _velvet_tpu().velvet_update_flat
  out = []
  for idx in chunks:
    n = sum(p_leaves[i].size for i in idx)
    bs = block_size or default_block_size(n + 1, interpret, kernel)
    buckets = pack(leaves, idx, -(-(n + 1) // bs) * bs)  # >= 1 padding: the link
    out.append(flat(*buckets, s, skip_zero_grads=skip_zero_grads, block_size=bs,
                    interpret=interpret))
  shapes = [p.shape for p in p_leaves]
  u, m1, v1 = (unpack([y[r] for y in out], layout, shapes) for r in range(3))
  return [x.astype(p.dtype) for x, p in zip(u, p_leaves)], m1, v1


def velvet_update(params, grads, mu, nu, *, lr, b1, b2, eps, weight_decay, count,
                  skip_zero_grads=False, interpret=None, impl=None, block_size=None,
                  max_chunk=MAX_CHUNK, shardings=None, bc1=None):
  """Fused Velvet/AdamW step on whole pytrees; returns ``(updates, new_mu, new_nu)``.

  ``grads`` are already clipped; ``lr``/``b1`` are the step's effective (possibly traced)
  scalars; ``count`` is the incremented int32 step (t >= 1); ``bc1``, when given,
  replaces ``1 - b1^t`` (the "product" bias correction). Updates follow optax's sign
  convention (add them to params) and have each param's dtype; moments are fp32.
  ``impl``: "auto" | "pallas" | "reference" (see ``_dispatch``) | "triton" | "mosaic"
  | "tpu" (a kernel by name; "pallas" and "auto" pick one with ``choose_kernel``; "tpu"
  is compiled for a TPU target and interpreted elsewhere).
  ``block_size``: elements per grid step, a power of two >= 128 (compiled for a GPU:
  <= 2^20 for Triton, <= 256 * 128 for Mosaic GPU); default: ``default_block_size``.
  ``max_chunk``: elements per bucket (one kernel call each; None: one bucket), see the
  module docstring.
  ``shardings``: optional pytree like ``params`` of ``NamedSharding`` (one mesh; grads
  and moments are taken to be sharded like their param). On a mesh of more than one
  device the kernel then runs per shard under ``jax.shard_map`` (each device packs its
  own shards; the outputs keep these shardings) instead of on whole gathered leaves.
  """
  kernel, interpret = choose_kernel(impl, interpret)
  if block_size is not None:
    _check_block_size(kernel, block_size, compiled=kernel is not None and not interpret)
  if kernel is None:  # moments in fp32, as the kernel's
    mu, nu = (jax.tree.map(lambda x: x.astype(jnp.float32), t) for t in (mu, nu))
    return velvet_update_reference(
        params, grads, mu, nu, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        count=count, skip_zero_grads=skip_zero_grads, bc1=bc1)
  p_leaves, treedef = jax.tree.flatten(params)
  if not p_leaves:
    return params, mu, nu
  leaves = [p_leaves] + [treedef.flatten_up_to(t) for t in (grads, mu, nu)]
  s = _scalars(lr, b1, b2, eps, weight_decay, count, bc1)
  body = functools.partial(_update_leaves, skip_zero_grads=skip_zero_grads,
                           block_size=block_size, interpret=interpret,
                           max_chunk=max_chunk, kernel=kernel)
  sharded = _shard_specs(shardings, treedef)
  if sharded is not None:
    mesh, specs = sharded
    # check_vma=False: replicated leaves' outputs are identical on every device
    body = jax.shard_map(body, mesh=mesh, in_specs=(specs,) * 4 + (P(),),
                         out_specs=(specs,) * 3, check_vma=False)
  out = body(*leaves, s)
  return tuple(jax.tree.unflatten(treedef, x) for x in out)


# The pure-JAX path under its kernel-side name (exported by ``vesperjax.kernels``).
velvet_update_reference_jnp = velvet_update_reference
