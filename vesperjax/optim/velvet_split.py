"""Velvet's optax transformations (the building blocks ``velvet()`` chains).

Each ``update`` reads the step's training signal from optax extra args:
``update(grads, state, params, loss=..., entropy=..., sparse_mask=...)``.
Without them the adaptive scales are 1 and the step is plain AdamW.

* ``scale_by_velvet``: the whole post-clipping step (adaptive lr and b1,
  moments, bias correction, decoupled decay, lr). It is one transformation
  because the fused kernel needs ``lr_t`` and ``b1_t`` together, and because
  a lazily skipped entry must also skip its weight decay.
* ``scale_by_velvet_moments`` + ``scale_by_velvet_learning_rate``: the same
  step split optax-style, so a custom chain can put ``optax.add_decayed_weights``
  (or anything else) between them.
"""
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from vesperjax.optim import signals
from vesperjax.optim import velvet as velvet_math

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]


class VelvetState(NamedTuple):
  """State of ``scale_by_velvet``; the scalars are the last step's values."""
  count: jax.Array            # int32 number of steps taken
  mu: optax.Updates           # first moment, fp32, shaped like params
  nu: optax.Updates           # second moment, fp32, shaped like params
  learning_rate: jax.Array    # effective lr_t = lr(step) * entropy_scale
  b1: jax.Array               # effective b1_t
  entropy_scale: jax.Array
  perplexity_scale: jax.Array


class VelvetMomentsState(NamedTuple):
  """State of ``scale_by_velvet_moments``."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  b1: jax.Array
  perplexity_scale: jax.Array


class VelvetLearningRateState(NamedTuple):
  """State of ``scale_by_velvet_learning_rate``."""
  count: jax.Array
  learning_rate: jax.Array
  entropy_scale: jax.Array


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _lr_at(learning_rate: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Schedules see the 0-based step index, as in ``optax.scale_by_schedule``."""
  return _f32(learning_rate(count) if callable(learning_rate)
              else learning_rate)


def _zeros_moments(params, mu_dtype):
  """fp32 (or ``mu_dtype``) zeros like params: same shape, same sharding."""
  def zeros(p):
    dt = mu_dtype or jnp.promote_types(p.dtype, jnp.float32)
    return jnp.zeros_like(p, dtype=dt)
  return jax.tree.map(zeros, params)


def _check_vocab(entropy_adaptive, vocab_size):
  if entropy_adaptive and vocab_size is None:
    raise ValueError(
        "Velvet: entropy_adaptive=True needs vocab_size (the entropy scale is "
        "normalised by ln V). Pass vocab_size=... or entropy_adaptive=False.")


def _broadcast_prefix(prefix, tree, fn):
  """``fn(prefix_leaf, tree_leaf)`` for each leaf of ``tree`` under a prefix."""
  return jax.tree.map(lambda m, sub: jax.tree.map(lambda x: fn(m, x), sub),
                      prefix, tree)


def apply_sparse_mask(grads: Any, sparse_mask: Optional[Any]) -> Any:
  """Zero the gradient where ``sparse_mask`` is False, marking it for skipping.

  ``sparse_mask`` is a prefix of the grads tree; leaves are Python bools or
  boolean arrays broadcastable to the leaf (e.g. one flag per expert row).
  """
  if sparse_mask is None:
    return grads
  return _broadcast_prefix(
      sparse_mask, grads,
      lambda m, g: jnp.where(m, g, jnp.zeros_like(g)) if not isinstance(m, bool)
      else (g if m else jnp.zeros_like(g)))


def _prepare_grads(grads, sparse_mask, sparse_aware):
  if sparse_mask is not None and not sparse_aware:
    raise ValueError("Velvet: sparse_mask= needs sparse_aware=True.")
  return apply_sparse_mask(grads, sparse_mask)


def _load_fused_kernel() -> Callable[..., Any]:
  """The Pallas kernel, imported only when ``fused=True`` is asked for."""
  try:
    from vesperjax.kernels import _velvet_update as kernel_module  # pylint: disable=g-import-not-at-top
    return kernel_module.velvet_update
  except (ImportError, AttributeError) as e:
    raise ImportError(
        "Velvet fused=True needs the Pallas kernel "
        "vesperjax.kernels._velvet_update.velvet_update, which could not be "
        f"imported ({e}). Use fused=False for the reference jnp path.") from e


def _grouped_step(step, params, grads, mu, nu, decay_mask, weight_decay,
                  shardings=None, **kw):
  """Run ``step`` once per weight-decay group (decayed / not decayed).

  The step takes a scalar weight decay (the kernel is one launch over many
  leaves), so a decay mask splits the leaves into at most two calls. Given
  ``shardings`` (a tree like params), each call gets its group's subset.
  """
  leaves, treedef = jax.tree.flatten(params)
  g, m, v = (treedef.flatten_up_to(t) for t in (grads, mu, nu))
  sh = None if shardings is None else treedef.flatten_up_to(shardings)
  if decay_mask is None:
    flags = [True] * len(leaves)
  else:
    flags = treedef.flatten_up_to(
        _broadcast_prefix(decay_mask, params, lambda f, _: bool(f)))
  n = len(leaves)
  out_u, out_m, out_v = [None] * n, [None] * n, [None] * n
  for decay in (True, False):
    idx = [i for i, f in enumerate(flags) if f == decay]
    if not idx:
      continue
    pick = lambda xs: [xs[i] for i in idx]  # pylint: disable=cell-var-from-loop
    extra = {} if sh is None else {"shardings": pick(sh)}
    u, nm, nv = step(pick(leaves), pick(g), pick(m), pick(v),
                     weight_decay=weight_decay if decay else 0.0, **extra, **kw)
    for j, i in enumerate(idx):
      out_u[i], out_m[i], out_v[i] = u[j], nm[j], nv[j]
  return tuple(treedef.unflatten(x) for x in (out_u, out_m, out_v))


def scale_by_velvet(
    learning_rate: ScalarOrSchedule = 5e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-3,
    *,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
    vocab_size: Optional[Any] = None,
    sparse_aware: bool = True,
    fused: bool = False,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    mu_dtype: Optional[Any] = None,
    shardings: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """The full Velvet step on (already clipped) gradients; returns final updates.

  Per step (``t`` counts from 1, ``lr`` is the schedule at step ``t - 1``)::

    es, ps = velvet_scales(loss, entropy)         # 1.0 when not given
    lr_t = lr * es;  b1_t = clip(b1 * ps, 0.5, 0.999)
    m = b1_t m + (1 - b1_t) g;  v = b2 v + (1 - b2) g^2
    u = -lr_t * (wd * p + (m / (1 - b1_t^t)) / (sqrt(v / (1 - b2^t)) + eps))

  Args:
    learning_rate: float or optax schedule.
    b1, b2, eps, weight_decay: as in ``optax.adamw``.
    entropy_adaptive: scale lr by the entropy scale (needs ``vocab_size``).
    perplexity_guided: scale b1 by the perplexity scale.
    vocab_size: V, for the ``ln V`` normalisation of the entropy.
    sparse_aware: lazy update: entries whose gradient is exactly 0.0 (or is
      masked out by the ``sparse_mask=`` extra arg) keep p, m and v unchanged,
      weight decay included. Dense gradients give the same result as False.
    fused: run the moments/update through the Pallas kernel
      (``vesperjax.kernels.velvet_update``); the scalars are computed the same.
    mask: weight-decay mask (pytree prefix of params or a callable), True where
      decay applies, as ``optax.adamw``'s ``mask``.
    mu_dtype: moments dtype; default fp32 (or the params' dtype if wider).
    shardings: with ``fused=True`` on a multi-device mesh, the params'
      shardings (a pytree like params of ``NamedSharding``, e.g. the ``params``
      of the train state's shardings; moments and grads are sharded alike).
      The kernel then runs per shard under ``jax.shard_map``; without it XLA,
      which cannot partition the kernel, gathers every whole parameter onto
      every device. Ignored when ``fused=False`` (XLA partitions that path).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``VelvetState``.
  """
  _check_vocab(entropy_adaptive, vocab_size)
  step = _load_fused_kernel() if fused else velvet_math.velvet_update_reference

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    return VelvetState(
        count=count,
        mu=_zeros_moments(params, mu_dtype),
        nu=_zeros_moments(params, mu_dtype),
        learning_rate=_lr_at(learning_rate, count),
        b1=_f32(b1),
        entropy_scale=jnp.ones([], jnp.float32),
        perplexity_scale=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, *, loss=None, entropy=None,
                sparse_mask=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_velvet needs params (decoupled weight decay).")
    es, ps = signals.velvet_scales(
        loss, entropy, vocab_size=vocab_size,
        entropy_adaptive=entropy_adaptive, perplexity_guided=perplexity_guided)
    lr_t = _lr_at(learning_rate, state.count) * es
    b1_t = signals.adapted_b1(b1, ps, perplexity_guided)
    count = optax.safe_increment(state.count)
    grads = _prepare_grads(updates, sparse_mask, sparse_aware)
    decay_mask = mask(params) if callable(mask) else mask
    new_updates, mu, nu = _grouped_step(
        step, params, grads, state.mu, state.nu, decay_mask, _f32(weight_decay),
        shardings=shardings if fused else None, lr=lr_t, b1=b1_t, b2=_f32(b2),
        eps=_f32(eps), count=count, skip_zero_grads=sparse_aware)
    return new_updates, VelvetState(
        count=count, mu=mu, nu=nu, learning_rate=lr_t, b1=b1_t,
        entropy_scale=es, perplexity_scale=ps)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_velvet_moments(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    perplexity_guided: bool = True,
    sparse_aware: bool = True,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Velvet's preconditioner alone: ``m_hat / (sqrt(v_hat) + eps)`` with b1_t.

  The ``optax.scale_by_adam`` of Velvet, for custom chains. Skipped entries
  (sparse_aware) get an exact-zero direction and unchanged moments; note that a
  later ``optax.add_decayed_weights`` would still decay them (use
  ``scale_by_velvet``'s own weight decay for a fully lazy update).
  """

  def init_fn(params):
    return VelvetMomentsState(
        count=jnp.zeros([], jnp.int32),
        mu=_zeros_moments(params, mu_dtype),
        nu=_zeros_moments(params, mu_dtype),
        b1=_f32(b1),
        perplexity_scale=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, *, loss=None, sparse_mask=None,
                **extra_args):
    del params, extra_args
    _, ps = signals.velvet_scales(loss, entropy_adaptive=False,
                                  perplexity_guided=perplexity_guided)
    b1_t = signals.adapted_b1(b1, ps, perplexity_guided)
    count = optax.safe_increment(state.count)
    grads = _prepare_grads(updates, sparse_mask, sparse_aware)

    def leaf(g, m, v):
      g32 = g.astype(m.dtype)
      new_m, new_v, d = velvet_math.adam_moments(
          g32, m, v, b1=b1_t.astype(m.dtype), b2=jnp.asarray(b2, m.dtype),
          eps=jnp.asarray(eps, m.dtype), t=count.astype(m.dtype))
      if sparse_aware:
        d, new_m, new_v = velvet_math.skip_where(
            g32 == 0, d, m, v, new_m, new_v)
      return d.astype(g.dtype), new_m, new_v

    out = jax.tree.map(leaf, grads, state.mu, state.nu)
    treedef = jax.tree.structure(grads)
    d, mu, nu = jax.tree.transpose(treedef, jax.tree.structure((0, 0, 0)), out)
    return d, VelvetMomentsState(count=count, mu=mu, nu=nu, b1=b1_t,
                                 perplexity_scale=ps)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_velvet_learning_rate(
    learning_rate: ScalarOrSchedule = 5e-4,
    *,
    entropy_adaptive: bool = True,
    vocab_size: Optional[Any] = None,
    flip_sign: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Multiply by ``-lr(step) * es`` (the entropy-adaptive learning rate).

  The ``optax.scale_by_learning_rate`` of Velvet; reads ``loss=`` and
  ``entropy=`` extra args.
  """
  _check_vocab(entropy_adaptive, vocab_size)
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params):
    del params
    count = jnp.zeros([], jnp.int32)
    return VelvetLearningRateState(
        count=count, learning_rate=_lr_at(learning_rate, count),
        entropy_scale=jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, *, loss=None, entropy=None,
                **extra_args):
    del params, extra_args
    es, _ = signals.velvet_scales(loss, entropy, vocab_size=vocab_size,
                                  entropy_adaptive=entropy_adaptive,
                                  perplexity_guided=False)
    lr_t = _lr_at(learning_rate, state.count) * es
    updates = jax.tree.map(lambda u: (sign * lr_t * u).astype(u.dtype), updates)
    return updates, VelvetLearningRateState(
        count=optax.safe_increment(state.count), learning_rate=lr_t,
        entropy_scale=es)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "VelvetState", "VelvetMomentsState", "VelvetLearningRateState",
    "scale_by_velvet", "scale_by_velvet_moments",
    "scale_by_velvet_learning_rate", "apply_sparse_mask",
]
