"""Velvet: AdamW whose step size and momentum follow the training signal.

Velvet adds two multipliers to AdamW, computed in-graph from the step's mean
loss ``L`` and, optionally, its mean predictive entropy ``H`` (both in nats;
traced fp32 scalars passed as optax extra args, so nothing syncs with the host)::

  es = clip((min(S, ln V) / ln V) / 0.5, 0.7, 1.3)   # entropy scale, S = H or L
  ps = clip(40 / max(exp(min(L, 20)), 1), 0.7, 1.3)  # perplexity scale

The entropy target 0.5 (normalised entropy at which the lr is unchanged), the
perplexity target 40, the log-perplexity cap 20, the band [0.7, 1.3] and the
b1 band [0.5, 0.999] are the original optimizer's constants. A missing or
non-finite signal gives a neutral 1: no ``loss`` gives ``ps = 1``; a non-finite
loss gives ``es = ps = 1``; a non-finite entropy gives ``es = 1``. These are the
``rules="original"``; ``rules="corrected"`` (averaged signals, a perplexity target
that follows the run's own loss, the rule on the momentum horizon, and the bias
correction below by the product of the b1s used) is in ``velvet_rules.py``.

Per step ``t = 1, 2, ...`` (``lr`` is the schedule at step ``t - 1``, as in
optax), on gradients already clipped by their global norm (``clipping.py``)::

  lr_t = lr * es                               (entropy_adaptive)
  b1_t = clip(b1 * ps, 0.5, 0.999)             (perplexity_guided)
  m'   = b1_t m + (1 - b1_t) g
  v'   = b2 v + (1 - b2) g^2
  d    = (m' / bc1) / (sqrt(v' / (1 - b2^t)) + eps)
  bc1  = 1 - b1_t^t (original) or 1 - prod_{i<=t} b1_i ("product")
  u    = -lr_t * (wd * p + d)                  (optax sign: p' = p + u)

The original's first-moment bias correction uses this step's adapted ``b1_t``. Weight decay is decoupled (AdamW) and follows ``lr_t``.
``p + u`` equals the original's two stages ``p *= 1 - lr_t wd;
p -= lr_t d``. With both features off and no clipping, Velvet is ``optax.adamw``.

Sparse (lazy) rule, ``sparse_aware``: where ``g == 0`` exactly (unused experts,
absent tokens' embedding rows) or the ``sparse_mask=`` extra arg is False,
``u = 0``, ``m' = m``, ``v' = v``: no momentum drift and no weight decay. The
bias corrections still use the global ``t``, as lazy Adam does. (The original
froze ``|p| < 1e-9``, which freezes every zero-initialised weight; not copied.)

``velvet_element`` (``velvet_math.py``) is that per-element math, written once: the
pytree reference ``velvet_update_reference``, the split blocks (``velvet_split.py``) and
the fused Pallas kernel (``vesperjax.kernels.velvet_update``) all call it. Guide:
docs/velvet.md.

References:
  thevesperhouse-hub/VelvetOptimizer, the original PyTorch optimizer:
    https://github.com/thevesperhouse-hub/VelvetOptimizer
  Kingma & Ba, Adam: A Method for Stochastic Optimization, arXiv:1412.6980.
  Loshchilov & Hutter, Decoupled Weight Decay Regularization (AdamW),
    arXiv:1711.05101.
"""
import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from vesperjax.optim import clipping
from vesperjax.optim import velvet_rules as rules_lib
from vesperjax.optim.velvet_math import (bias_corrections, velvet_element,
                                         velvet_update_reference)
from vesperjax.optim.velvet_rules import adapted_b1  # noqa: F401  (public here too)


class VelvetScales(NamedTuple):
  """Multipliers for the learning rate and beta1 (fp32 scalars)."""
  entropy_scale: jax.Array
  perplexity_scale: jax.Array


def velvet_scales(
    loss: Optional[Any] = None,
    entropy: Optional[Any] = None,
    *,
    vocab_size: Optional[Any] = None,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
) -> VelvetScales:
  """Entropy scale ``es`` (for the lr) and perplexity scale ``ps`` (for b1) of one
  batch's signal under the original rules (no averaging).

  The rules and their neutral cases are in the module docstring; a disabled
  feature always gives 1. ``entropy_adaptive`` with a signal needs
  ``vocab_size`` (ValueError otherwise).
  """
  return velvet_scales_of(rules_lib.init_signals(), loss, entropy, rules_lib.ORIGINAL,
                          vocab_size=vocab_size, entropy_adaptive=entropy_adaptive,
                          perplexity_guided=perplexity_guided)[1]


def velvet_scales_of(signals: rules_lib.SignalState, loss, entropy,
                     rules: rules_lib.VelvetRules, *, vocab_size=None,
                     entropy_adaptive=True, perplexity_guided=True):
  """``(new signal averages, VelvetScales)``: this step's signal folded into
  ``signals``, and the scales ``rules`` give from them."""
  signals, s = rules_lib.track_signals(signals, loss, entropy, rules)
  has_loss, has_entropy = loss is not None, entropy is not None
  one = jnp.ones([], jnp.float32)
  es = ps = one
  if entropy_adaptive and (has_loss or has_entropy):
    check_vocab(entropy_adaptive, vocab_size)
    es = rules_lib.entropy_scale(s, vocab_size, use_loss=not has_entropy)
  if perplexity_guided and has_loss:
    ps = rules_lib.perplexity_scale(s, rules)
  return signals, VelvetScales(entropy_scale=es, perplexity_scale=ps)


class VelvetState(NamedTuple):
  """State of ``scale_by_velvet``; the scalars are the last step's values."""
  count: jax.Array            # int32 number of steps taken
  mu: optax.Updates           # first moment, fp32, shaped like params
  nu: optax.Updates           # second moment, fp32, shaped like params
  learning_rate: jax.Array    # effective lr_t = lr(step) * entropy_scale
  b1: jax.Array               # effective b1_t
  entropy_scale: jax.Array
  perplexity_scale: jax.Array
  b1_product: jax.Array       # prod of the b1_t used so far ("product" correction)
  signals: rules_lib.SignalState  # the averaged loss and entropy the rules read


def f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def lr_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """Schedules see the 0-based step index, as in ``optax.scale_by_schedule``."""
  return f32(learning_rate(count) if callable(learning_rate) else learning_rate)


def zeros_moments(params, mu_dtype):
  """fp32 (or ``mu_dtype``) zeros like params: same shape, same sharding."""
  return jax.tree.map(lambda p: jnp.zeros_like(
      p, dtype=mu_dtype or jnp.promote_types(p.dtype, jnp.float32)), params)


def check_vocab(entropy_adaptive, vocab_size):
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


def prepare_grads(grads, sparse_mask, sparse_aware):
  if sparse_mask is not None and not sparse_aware:
    raise ValueError("Velvet: sparse_mask= needs sparse_aware=True.")
  return apply_sparse_mask(grads, sparse_mask)


def _load_fused_kernel(kernel: bool | str) -> Callable[..., Any]:
  """The Pallas kernel, imported only when ``fused`` is asked for: True or "auto" (the
  platform table's choice), "triton", "mosaic" (GPU) or "tpu" (Mosaic TPU)."""
  try:
    from vesperjax.kernels import velvet_update  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"Velvet fused=True needs vesperjax.kernels.velvet_update "
                      f"({e}); fused=False is the reference jnp path.") from e
  if kernel is True or kernel == "auto":
    return velvet_update
  if kernel not in ("triton", "mosaic", "tpu"):
    raise ValueError(f"Velvet fused={kernel!r}: expected a bool, 'auto', 'triton', "
                     "'mosaic' or 'tpu'")
  return functools.partial(velvet_update, impl=kernel)


def _grouped_step(step, params, grads, mu, nu, decay_mask, weight_decay,
                  shardings=None, **kw):
  """Run ``step`` once per weight-decay group (decayed / not decayed).

  The step takes a scalar weight decay (the kernel is one launch over many
  leaves), so a decay mask splits the leaves into at most two calls. Given
  ``shardings`` (a tree like params), each call gets its group's subset.
  """
  leaves, treedef = jax.tree.flatten(params)
  rows = [leaves] + [treedef.flatten_up_to(t) for t in (grads, mu, nu)]
  sh = None if shardings is None else treedef.flatten_up_to(shardings)
  flags = [True] * len(leaves) if decay_mask is None else treedef.flatten_up_to(
      _broadcast_prefix(decay_mask, params, lambda f, _: bool(f)))
  out = [[None] * len(leaves) for _ in range(3)]
  for decay in (True, False):
    idx = [i for i, f in enumerate(flags) if f == decay]
    pick = lambda xs: [xs[i] for i in idx]  # pylint: disable=cell-var-from-loop
    extra = {} if sh is None else {"shardings": pick(sh)}
    if idx:
      res = step(*map(pick, rows), weight_decay=weight_decay if decay else 0.0,
                 **extra, **kw)
      for j, i in enumerate(idx):
        for o, r in zip(out, res):
          o[i] = r[j]
  return tuple(treedef.unflatten(x) for x in out)


def scale_by_velvet(
    learning_rate: optax.ScalarOrSchedule = 5e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-3,
    *,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
    vocab_size: Optional[Any] = None,
    sparse_aware: bool = True,
    fused: bool | str = False,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    mu_dtype: Optional[Any] = None,
    shardings: Optional[Any] = None,
    rules: str | rules_lib.VelvetRules = "original",
) -> optax.GradientTransformationExtraArgs:
  """The whole Velvet step on (already clipped) gradients; returns final updates.

  ``update(grads, state, params, loss=..., entropy=..., sparse_mask=...)``; the
  math is the module docstring's. One transformation rather than moments +
  decay + lr because the fused kernel needs ``lr_t`` and ``b1_t`` together and
  a lazily skipped entry must also skip its weight decay.

  Args:
    learning_rate: float or optax schedule.
    b1, b2, eps, weight_decay: as in ``optax.adamw``.
    entropy_adaptive: scale lr by the entropy scale (needs ``vocab_size``).
    perplexity_guided: scale b1 by the perplexity scale.
    vocab_size: V, for the ``ln V`` normalisation of the entropy.
    sparse_aware: the lazy rule, for exact-zero gradients and entries masked
      out by the ``sparse_mask=`` extra arg (see ``apply_sparse_mask``).
      Dense gradients give the same result as False.
    fused: run the moments/update through the Pallas kernel
      (``vesperjax.kernels.velvet_update``); the scalars are computed the same. True
      or "auto": the platform table's kernel; "triton" or "mosaic": that one.
    mask: weight-decay mask (pytree prefix of params or a callable), True where
      decay applies, as ``optax.adamw``'s ``mask``.
    mu_dtype: moments dtype; default fp32 (or the params' dtype if wider).
    shardings: with ``fused=True`` on a multi-device mesh, the params'
      shardings (a pytree like params of ``NamedSharding``; grads and moments
      are sharded alike): the kernel runs per shard under ``jax.shard_map``
      (XLA cannot partition it; it would gather every parameter whole onto
      every device). Ignored when ``fused=False``: XLA partitions that path.
    rules: "original" (the original optimizer's rules), "corrected", or a
      ``velvet_rules.VelvetRules``: how loss and entropy become the scales.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``VelvetState``.
  """
  check_vocab(entropy_adaptive, vocab_size)
  rules = rules_lib.resolve_rules(rules)
  step = _load_fused_kernel(fused) if fused else velvet_update_reference

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    return VelvetState(
        count=count, mu=zeros_moments(params, mu_dtype),
        nu=zeros_moments(params, mu_dtype), learning_rate=lr_at(learning_rate, count),
        b1=f32(b1), entropy_scale=jnp.ones([], jnp.float32),
        perplexity_scale=jnp.ones([], jnp.float32),
        b1_product=jnp.ones([], jnp.float32), signals=rules_lib.init_signals())

  def update_fn(updates, state, params=None, *, loss=None, entropy=None,
                sparse_mask=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("scale_by_velvet needs params (decoupled weight decay).")
    signals, (es, ps) = velvet_scales_of(
        state.signals, loss, entropy, rules, vocab_size=vocab_size,
        entropy_adaptive=entropy_adaptive, perplexity_guided=perplexity_guided)
    lr_t = lr_at(learning_rate, state.count) * es
    b1_t = adapted_b1(b1, ps, perplexity_guided, rules)
    count = optax.safe_increment(state.count)
    bc1, b1_product = rules_lib.first_moment_correction(b1_t, count, state.b1_product,
                                                        rules)
    grads = prepare_grads(updates, sparse_mask, sparse_aware)
    decay_mask = mask(params) if callable(mask) else mask
    new_updates, mu, nu = _grouped_step(
        step, params, grads, state.mu, state.nu, decay_mask, f32(weight_decay),
        shardings=shardings if fused else None, lr=lr_t, b1=b1_t, b2=f32(b2),
        eps=f32(eps), count=count, skip_zero_grads=sparse_aware,
        bc1=bc1 if rules.bias_correction == "product" else None)
    return new_updates, VelvetState(
        count=count, mu=mu, nu=nu, learning_rate=lr_t, b1=b1_t,
        entropy_scale=es, perplexity_scale=ps, b1_product=b1_product, signals=signals)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def velvet(
    learning_rate: optax.ScalarOrSchedule = 5e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-3,
    max_grad_norm: Optional[Any] = 1.0,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
    sparse_aware: bool = True,
    vocab_size: Optional[Any] = None,
    fused: bool | str = False,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    mu_dtype: Optional[Any] = None,
    *,
    shardings: Optional[Any] = None,
    rules: str | rules_lib.VelvetRules = "original",
) -> optax.GradientTransformationExtraArgs:
  """Velvet: AdamW with an entropy-adaptive lr and a perplexity-guided b1.

  ``chain(clip_by_global_norm_with_stats(max_grad_norm), scale_by_velvet(...))``:
  ``max_grad_norm`` is the global-norm clipping threshold, applied first
  (``None`` or ``inf`` disables clipping); the other arguments are
  ``scale_by_velvet``'s. Call ``update(grads, state, params, loss=mean_loss,
  entropy=mean_entropy)``; both are optional fp32 scalars (traced is fine:
  nothing leaves the device). Without them, or with both adaptive features
  off, it is ``optax.adamw`` after clipping. ``entropy_adaptive`` needs
  ``vocab_size``: a ValueError is raised at construction otherwise.
  """
  return optax.chain(
      clipping.clip_by_global_norm_with_stats(max_grad_norm),
      scale_by_velvet(
          learning_rate, b1, b2, eps, weight_decay,
          entropy_adaptive=entropy_adaptive,
          perplexity_guided=perplexity_guided, vocab_size=vocab_size,
          sparse_aware=sparse_aware, fused=fused, mask=mask,
          mu_dtype=mu_dtype, shardings=shardings, rules=rules))


__all__ = [
    "velvet", "scale_by_velvet", "VelvetState", "velvet_update_reference",
    "velvet_element", "bias_corrections", "velvet_scales", "adapted_b1",
    "VelvetScales", "apply_sparse_mask",
]
