"""Velvet's step split optax-style, for custom chains.

``scale_by_velvet_moments`` (Velvet's ``optax.scale_by_adam``) and
``scale_by_velvet_learning_rate`` (its ``optax.scale_by_learning_rate``) chain
to ``scale_by_velvet`` without weight decay, so a custom chain can put
``optax.add_decayed_weights`` (or anything else) between them. The math is
``velvet.velvet_element``'s; each reads its training signal from the optax
extra args (``loss=``, ``entropy=``, ``sparse_mask=``).
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from vesperjax.optim import velvet_rules as rules_lib
from vesperjax.optim.velvet import check_vocab
from vesperjax.optim.velvet import f32
from vesperjax.optim.velvet import lr_at
from vesperjax.optim.velvet import prepare_grads
from vesperjax.optim.velvet_math import map_leaves3
from vesperjax.optim.velvet_math import velvet_leaf
from vesperjax.optim.velvet import velvet_scales_of
from vesperjax.optim.velvet import zeros_moments


class VelvetMomentsState(NamedTuple):
  """State of ``scale_by_velvet_moments``."""
  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  b1: jax.Array
  perplexity_scale: jax.Array
  b1_product: jax.Array
  signals: rules_lib.SignalState


class VelvetLearningRateState(NamedTuple):
  """State of ``scale_by_velvet_learning_rate``."""
  count: jax.Array
  learning_rate: jax.Array
  entropy_scale: jax.Array
  signals: rules_lib.SignalState


def scale_by_velvet_moments(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    *,
    perplexity_guided: bool = True,
    sparse_aware: bool = True,
    mu_dtype: Optional[Any] = None,
    rules: str | rules_lib.VelvetRules = "original",
) -> optax.GradientTransformationExtraArgs:
  """Velvet's preconditioner alone: ``m_hat / (sqrt(v_hat) + eps)`` with b1_t.

  Skipped entries (sparse_aware) get an exact-zero direction and unchanged
  moments; note that a later ``optax.add_decayed_weights`` would still decay
  them (use ``scale_by_velvet``'s own weight decay for a fully lazy update).
  ``rules``: as ``scale_by_velvet``'s (its perplexity rule and bias correction).
  """
  rules = rules_lib.resolve_rules(rules)

  def init_fn(params):
    return VelvetMomentsState(
        count=jnp.zeros([], jnp.int32),
        mu=zeros_moments(params, mu_dtype),
        nu=zeros_moments(params, mu_dtype),
        b1=f32(b1),
        perplexity_scale=jnp.ones([], jnp.float32),
        b1_product=jnp.ones([], jnp.float32),
        signals=rules_lib.init_signals())

  def update_fn(updates, state, params=None, *, loss=None, sparse_mask=None,
                **extra_args):
    del params, extra_args
    signals, (_, ps) = velvet_scales_of(
        state.signals, loss, None, rules, entropy_adaptive=False,
        perplexity_guided=perplexity_guided)
    b1_t = rules_lib.adapted_b1(b1, ps, perplexity_guided, rules)
    count = optax.safe_increment(state.count)
    bc1, b1_product = rules_lib.first_moment_correction(b1_t, count, state.b1_product,
                                                        rules)
    grads = prepare_grads(updates, sparse_mask, sparse_aware)
    d, mu, nu = map_leaves3(
        lambda g, m, v: velvet_leaf(
            None, g, m, v, b1=b1_t, b2=b2, eps=eps, count=count,
            skip_zero_grads=sparse_aware,
            bc1=bc1 if rules.bias_correction == "product" else None),
        grads, state.mu, state.nu)
    return d, VelvetMomentsState(count=count, mu=mu, nu=nu, b1=b1_t,
                                 perplexity_scale=ps, b1_product=b1_product,
                                 signals=signals)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_velvet_learning_rate(
    learning_rate: optax.ScalarOrSchedule = 5e-4,
    *,
    entropy_adaptive: bool = True,
    vocab_size: Optional[Any] = None,
    flip_sign: bool = True,
    rules: str | rules_lib.VelvetRules = "original",
) -> optax.GradientTransformationExtraArgs:
  """Multiply by ``-lr(step) * es`` (the entropy-adaptive learning rate).

  Reads the ``loss=`` and ``entropy=`` extra args. With ``flip_sign=False`` and a
  learning rate of 1 it is the entropy rule alone, a multiplier to put after any
  optimizer (``optax.chain(optax.adamw(...), scale_by_velvet_learning_rate(1.0,
  flip_sign=False, vocab_size=V))``). ``rules``: as ``scale_by_velvet``'s (its signal
  averaging).
  """
  check_vocab(entropy_adaptive, vocab_size)
  rules = rules_lib.resolve_rules(rules)
  sign = -1.0 if flip_sign else 1.0

  def init_fn(params):
    del params
    count = jnp.zeros([], jnp.int32)
    return VelvetLearningRateState(
        count=count, learning_rate=lr_at(learning_rate, count),
        entropy_scale=jnp.ones([], jnp.float32), signals=rules_lib.init_signals())

  def update_fn(updates, state, params=None, *, loss=None, entropy=None,
                **extra_args):
    del params, extra_args
    signals, (es, _) = velvet_scales_of(
        state.signals, loss, entropy, rules, vocab_size=vocab_size,
        entropy_adaptive=entropy_adaptive, perplexity_guided=False)
    lr_t = lr_at(learning_rate, state.count) * es
    updates = jax.tree.map(lambda u: (sign * lr_t * u).astype(u.dtype), updates)
    return updates, VelvetLearningRateState(
        count=optax.safe_increment(state.count), learning_rate=lr_t,
        entropy_scale=es, signals=signals)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


__all__ = [
    "VelvetMomentsState", "VelvetLearningRateState",
    "scale_by_velvet_moments", "scale_by_velvet_learning_rate",
]
