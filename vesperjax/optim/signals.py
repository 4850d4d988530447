"""Velvet's adaptive scales, computed in-graph from the step's loss / entropy.

The original reads ``loss.item()`` every step; here the scales are ``jnp``
expressions on traced scalars, so a jitted train step never syncs with the host.
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

# Constants of the original optimizer.
SCALE_MIN = 0.7
SCALE_MAX = 1.3
ENTROPY_TARGET = 0.5     # normalised entropy at which the lr is unchanged
PERPLEXITY_TARGET = 40.0  # perplexity above which momentum is lowered
MAX_LOG_PERPLEXITY = 20.0
B1_MIN = 0.5
B1_MAX = 0.999


class VelvetScales(NamedTuple):
  """Multipliers for the learning rate and beta1 (fp32 scalars)."""
  entropy_scale: jax.Array
  perplexity_scale: jax.Array


def _scalar(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 0:
    raise ValueError(f"Velvet: `{name}` must be a scalar (the step's mean), "
                     f"got shape {x.shape}.")
  return x


def velvet_scales(
    loss: Optional[Any] = None,
    entropy: Optional[Any] = None,
    *,
    vocab_size: Optional[Any] = None,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
) -> VelvetScales:
  """Entropy scale ``es`` (for the lr) and perplexity scale ``ps`` (for b1).

  ``es = clip((min(L, ln V) / ln V) / 0.5, 0.7, 1.3)`` with ``L`` the mean
  predictive entropy if given, else the loss (both in nats);
  ``ps = clip(40 / max(exp(min(loss, 20)), 1), 0.7, 1.3)``.

  Every missing or non-finite signal gives a neutral scale of 1, so a NaN loss
  step (which the trainer will usually skip anyway) never poisons the state:
  a non-finite ``loss`` makes both scales 1; a non-finite ``entropy`` makes
  ``es`` 1. Without a ``loss``, ``ps`` is 1 and ``es`` uses ``entropy`` alone.
  A disabled feature always gives 1.
  """
  one = jnp.ones([], jnp.float32)
  loss = None if loss is None else _scalar(loss, "loss")
  entropy = None if entropy is None else _scalar(entropy, "entropy")
  loss_ok = one.astype(bool) if loss is None else jnp.isfinite(loss)

  es = one
  signal = entropy if entropy is not None else loss
  if entropy_adaptive and signal is not None:
    if vocab_size is None:
      raise ValueError("Velvet: entropy_adaptive needs vocab_size (ln V "
                       "normalises the entropy).")
    log_v = jnp.log(jnp.asarray(vocab_size, jnp.float32))
    raw = (jnp.minimum(signal, log_v) / log_v) / ENTROPY_TARGET
    es = jnp.where(loss_ok & jnp.isfinite(signal),
                   jnp.clip(raw, SCALE_MIN, SCALE_MAX), one)

  ps = one
  if perplexity_guided and loss is not None:
    ppl = jnp.maximum(jnp.exp(jnp.minimum(loss, MAX_LOG_PERPLEXITY)), 1.0)
    ps = jnp.where(loss_ok, jnp.clip(PERPLEXITY_TARGET / ppl, SCALE_MIN,
                                     SCALE_MAX), one)
  return VelvetScales(entropy_scale=es, perplexity_scale=ps)


def adapted_b1(b1: Any, perplexity_scale: jax.Array,
               perplexity_guided: bool = True) -> jax.Array:
  """``clip(b1 * ps, 0.5, 0.999)`` if perplexity-guided, else ``b1`` as is.

  Leaving b1 unclipped when the feature is off keeps Velvet == AdamW exactly.
  """
  b1 = jnp.asarray(b1, jnp.float32)
  if not perplexity_guided:
    return b1
  return jnp.clip(b1 * perplexity_scale, B1_MIN, B1_MAX)
