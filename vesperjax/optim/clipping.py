"""Global-norm clipping that keeps the pre-clip norm in its state, for logging.

``optax.clip_by_global_norm`` has an empty state, so the norm a trainer wants to
log would have to be recomputed. This drop-in variant stores it (fp32 scalar).
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class GlobalNormState(NamedTuple):
  """``grad_norm``: global L2 norm of the incoming gradients, before clipping."""
  grad_norm: jax.Array


def global_norm(tree: Any) -> jax.Array:
  """fp32 global L2 norm (bf16 gradients are squared and summed in fp32)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in leaves))


def _upcast(g):
  return g.astype(jnp.promote_types(g.dtype, jnp.float32))


def clip_by_global_norm_with_stats(
    max_norm: Optional[Any] = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Scale the gradients so their global norm is at most ``max_norm``.

  Same rule as ``optax.clip_by_global_norm``. ``max_norm=None`` or ``inf``
  disables clipping but still records the norm. ``max_norm`` may be a traced
  scalar (``optax.inject_hyperparams``), so it is never compared in Python.
  Clipped gradients come out in fp32 (or wider): rescaling bf16 gradients and
  rounding back would add a second bf16 rounding before the fp32 moments; under
  jit the cast fuses into the consumer. Exact zeros stay exactly zero.
  """

  def init_fn(params):
    del params
    return GlobalNormState(grad_norm=jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del state, params, extra_args
    norm = global_norm(updates)
    if max_norm is not None:
      limit = jnp.asarray(max_norm, jnp.float32)
      # min(1, limit / norm); a zero norm gives inf -> 1, an inf limit -> 1.
      scale = jnp.minimum(1.0, limit / norm)
      updates = jax.tree.map(lambda g: _upcast(g) * scale, updates)
    return updates, GlobalNormState(grad_norm=norm)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
