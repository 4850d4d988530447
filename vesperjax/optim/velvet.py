"""Velvet: AdamW whose step size and momentum follow the training signal.

This module holds the per-parameter math. ``velvet_update_reference`` is the
pure-JAX definition of one Velvet step over whole pytrees; the fused Pallas
kernel (``vesperjax.kernels.velvet_update``) has the same signature and is
tested against it.
"""
from typing import Any

import jax
import jax.numpy as jnp


def adam_moments(g, m, v, *, b1, b2, eps, t):
  """Adam moments and bias-corrected direction ``m_hat / (sqrt(v_hat) + eps)``."""
  new_m = b1 * m + (1 - b1) * g
  new_v = b2 * v + (1 - b2) * (g * g)
  # Bias correction uses this step's (possibly adapted) b1, as the original.
  m_hat = new_m / (1 - b1**t)
  v_hat = new_v / (1 - b2**t)
  return new_m, new_v, m_hat / (jnp.sqrt(v_hat) + eps)


def skip_where(skip, u, m, v, new_m, new_v):
  """Where ``skip``: no update, moments unchanged (sparse_aware)."""
  return (jnp.where(skip, jnp.zeros_like(u), u), jnp.where(skip, m, new_m),
          jnp.where(skip, v, new_v))


def _velvet_leaf(p, g, m, v, *, lr, b1, b2, eps, weight_decay, count,
                 skip_zero_grads):
  """One leaf of ``velvet_update_reference``; math in the moments' dtype."""
  dt = m.dtype
  g = g.astype(dt)
  lr, b1, b2, eps, weight_decay = (
      jnp.asarray(x, dt) for x in (lr, b1, b2, eps, weight_decay))
  t = jnp.asarray(count).astype(dt)
  new_m, new_v, direction = adam_moments(g, m, v, b1=b1, b2=b2, eps=eps, t=t)
  u = -lr * (weight_decay * p.astype(dt) + direction)
  if skip_zero_grads:
    u, new_m, new_v = skip_where(g == 0, u, m, v, new_m, new_v)
  return u.astype(p.dtype), new_m, new_v


def velvet_update_reference(
    params: Any,
    grads: Any,
    mu: Any,
    nu: Any,
    *,
    lr: Any,
    b1: Any,
    b2: Any,
    eps: Any,
    weight_decay: Any,
    count: Any,
    skip_zero_grads: bool,
) -> tuple[Any, Any, Any]:
  """One Velvet step over pytrees, in plain ``jnp`` (the reference path).

  Args:
    params: current parameters (any float dtype; fp32 master weights).
    grads: gradients, already clipped; may be lower precision (bf16) and are
      cast to the moments' dtype before use.
    mu, nu: first and second moments (fp32), same structure as ``params``.
    lr, b1: the *effective* (already adapted) learning rate and beta1 scalars.
    b2, eps, weight_decay: scalars.
    count: int32 step number, already incremented (``t >= 1``).
    skip_zero_grads: if True, entries whose gradient is exactly ``0.0`` are
      left alone: zero update, ``mu`` and ``nu`` unchanged (lazy update).

  Returns:
    ``(updates, new_mu, new_nu)`` where
    ``updates = -lr * (weight_decay * p + m_hat / (sqrt(v_hat) + eps))``,
    ``m_hat = m / (1 - b1**t)``, ``v_hat = v / (1 - b2**t)``; ``updates`` has
    the params' dtypes. ``params + updates`` equals the original's two-stage
    step ``p *= 1 - lr*wd; p -= lr * m_hat / (sqrt(v_hat) + eps)``.
  """
  kw = dict(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
            count=count, skip_zero_grads=skip_zero_grads)
  out = jax.tree.map(lambda p, g, m, v: _velvet_leaf(p, g, m, v, **kw),
                     params, grads, mu, nu)
  treedef = jax.tree.structure(params)
  updates, new_mu, new_nu = jax.tree.transpose(
      treedef, jax.tree.structure((0, 0, 0)), out)
  return updates, new_mu, new_nu
