"""Velvet's per-element math, written once (module docstring of ``velvet.py`` has the
equations): ``velvet_element`` on arrays or a kernel's loaded blocks, ``velvet_leaf`` on
one leaf, ``velvet_update_reference`` on pytrees. The optimizer (``velvet.py``), the split
blocks and the fused Pallas kernels (``vesperjax.kernels.velvet_update``) all call it; it
imports neither, so the kernels can."""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp


def bias_corrections(b1: Any, b2: Any, t: Any) -> tuple[Any, Any]:
  """``(1 - b1^t, 1 - b2^t)``, with this step's (adapted) ``b1``."""
  return 1 - b1**t, 1 - b2**t


def velvet_element(p, g, m, v, *, b1, b2, eps, bc1, bc2, lr=None,
                   weight_decay=None, skip_zero_grads=False, sqrt=jnp.sqrt):
  """One Velvet step on elements (arrays, or a kernel's loaded blocks).

  Returns ``(u, m', v')`` of the module docstring, in ``m``'s dtype (``g``
  and ``p`` are cast to it; the scalars should be in it too). ``bc1, bc2``:
  ``bias_corrections``, computed once per step. With ``lr=None``, ``u = d``,
  the direction alone (``scale_by_velvet_moments``; ``p`` is unused).
  ``skip_zero_grads``: the lazy rule for entries with ``g == 0``.
  ``sqrt``: the square root to use (a kernel backend without one passes its
  own, e.g. Mosaic GPU's through rsqrt).
  """
  g = g.astype(m.dtype)
  new_m = b1 * m + (1 - b1) * g
  new_v = b2 * v + (1 - b2) * (g * g)
  u = (new_m / bc1) / (sqrt(new_v / bc2) + eps)
  if lr is not None:
    u = -lr * (weight_decay * p.astype(m.dtype) + u)
  if skip_zero_grads:
    live = g != 0
    u = jnp.where(live, u, jnp.zeros_like(u))
    new_m = jnp.where(live, new_m, m)
    new_v = jnp.where(live, new_v, v)
  return u, new_m, new_v


def velvet_leaf(p, g, m, v, *, b1, b2, eps, count, lr=None, weight_decay=None,
                skip_zero_grads=False, bc1=None):
  """``velvet_element`` on one leaf, its scalars cast to the moments' dtype.

  ``u`` comes back in the dtype of what it updates: ``p``'s for the whole
  step, ``g``'s for the direction alone (``lr=None``). ``bc1``: the first
  moment's bias correction when not ``1 - b1^count`` (the "product" rule).
  """
  dt = m.dtype
  b1, b2, eps = (jnp.asarray(x, dt) for x in (b1, b2, eps))
  step_bc1, bc2 = bias_corrections(b1, b2, jnp.asarray(count).astype(dt))
  bc1 = step_bc1 if bc1 is None else jnp.asarray(bc1, dt)
  if lr is not None:
    lr, weight_decay = jnp.asarray(lr, dt), jnp.asarray(weight_decay, dt)
  u, new_m, new_v = velvet_element(
      p, g, m, v, b1=b1, b2=b2, eps=eps, bc1=bc1, bc2=bc2, lr=lr,
      weight_decay=weight_decay, skip_zero_grads=skip_zero_grads)
  return u.astype(g.dtype if lr is None else p.dtype), new_m, new_v


def map_leaves3(fn: Callable[..., Any], tree: Any, *rest: Any):
  """``fn`` per leaf returning a triple -> three trees shaped like ``tree``."""
  out = jax.tree.map(fn, tree, *rest)
  return tuple(jax.tree.transpose(
      jax.tree.structure(tree), jax.tree.structure((0, 0, 0)), out))


def velvet_update_reference(params: Any, grads: Any, mu: Any, nu: Any, *,
                            lr: Any, b1: Any, b2: Any, eps: Any,
                            weight_decay: Any, count: Any,
                            skip_zero_grads: bool = False, bc1: Any = None):
  """One Velvet step over pytrees, in plain ``jnp`` (the fused kernel's contract).

  ``grads`` are already clipped; ``lr`` and ``b1`` are the step's effective
  (adapted) ``lr_t`` and ``b1_t``; ``count`` is the step ``t``, already
  incremented (``t >= 1``); ``skip_zero_grads`` is the lazy rule; ``bc1``
  replaces ``1 - b1^t`` when given (the "product" bias correction). The math
  runs in the moments' dtype (fp32 by default) per ``velvet_element``.
  Returns ``(updates, new_mu, new_nu)``, ``updates`` in the params' dtypes.
  """
  return map_leaves3(functools.partial(
      velvet_leaf, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
      count=count, skip_zero_grads=skip_zero_grads, bc1=bc1), params, grads, mu, nu)
