"""Repetition, frequency and presence penalties for generation, inside the decode loop.

Repetition (the original VesperLM generate.py's rule, as in CTRL, Keskar et al. 2019):
every token in the prompt or generated so far has its logit divided by the penalty if
positive, multiplied by it otherwise. Frequency and presence (OpenAI's definitions, over
generated tokens only): `logit - count * frequency - (count > 0) * presence`.

`vesperjax.inference.sampling` carries a per-row `TokenHistory` through its loop: the prompt's
tokens and a count of each generated token, updated by one scatter of B ids a step
(rebuilding the counts from the output buffer would scan the whole buffer every step).
The settings are traced values (`Penalties`), so changing them does not recompile.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Penalties(NamedTuple):
  """Traced penalty settings (float32 scalars); `Penalties.off()` changes nothing."""
  repetition: jax.Array  # > 0; 1 = off
  frequency: jax.Array   # 0 = off
  presence: jax.Array    # 0 = off

  @classmethod
  def of(cls, repetition=1.0, frequency=0.0, presence=0.0) -> "Penalties":
    return cls(jnp.float32(repetition), jnp.float32(frequency), jnp.float32(presence))

  @classmethod
  def off(cls) -> "Penalties":
    return cls.of()


class TokenHistory(NamedTuple):
  """Per row, what the penalties look at."""
  in_prompt: jax.Array  # [B, V] bool: the token occurs in the prompt
  generated: jax.Array  # [B, V] int32: how often it was generated so far

  @classmethod
  def of_prompt(cls, tokens: jax.Array, length, vocab_size: int) -> "TokenHistory":
    """History of the first `length` tokens of each row of `tokens` [B, P]."""
    batch, width = tokens.shape
    ids = jnp.where(jnp.arange(width) < length, tokens, vocab_size)  # padding: dropped
    rows = jnp.arange(batch)[:, None]
    in_prompt = jnp.zeros((batch, vocab_size), bool).at[rows, ids].set(True, mode="drop")
    return cls(in_prompt, jnp.zeros((batch, vocab_size), jnp.int32))

  def add(self, tok: jax.Array) -> "TokenHistory":
    """The history after each row generated `tok` [B]."""
    rows = jnp.arange(tok.shape[0])
    return self._replace(generated=self.generated.at[rows, tok].add(1, mode="drop"))


def apply_penalties(logits: jax.Array, history: TokenHistory,
                    penalties: Penalties) -> jax.Array:
  """Logits [B, V] after the repetition, frequency and presence penalties, in that order.

  Repetition (the original VesperLM generate.py's rule, as in CTRL): every token in the
  prompt or generated so far has its logit divided by the penalty if positive, multiplied
  by it otherwise. Frequency and presence (OpenAI's definitions, generated tokens only):
  `logit - count * frequency - (count > 0) * presence`. Applied before temperature;
  when all three are off the logits pass through untouched (a `lax.cond`, so no work).
  """
  logits = jnp.asarray(logits, jnp.float32)

  def penalise(logits):
    seen = history.in_prompt | (history.generated > 0)
    rep = penalties.repetition
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = history.generated.astype(jnp.float32)
    return (logits - counts * penalties.frequency
            - (history.generated > 0) * penalties.presence)

  on = ((penalties.repetition != 1) | (penalties.frequency != 0)
        | (penalties.presence != 0))
  return jax.lax.cond(on, penalise, lambda x: x, logits)


def check_penalties(repetition: float, frequency: float, presence: float) -> None:
  """ValueError unless the penalties are usable: repetition finite and > 0, the others
  finite (negative values reward repeats, as OpenAI's API allows)."""
  if not (np.isfinite(repetition) and repetition > 0):
    raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got "
                     f"{repetition}")
  for name, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
    if not np.isfinite(value):
      raise ValueError(f"{name} must be a finite number (0 = off), got {value}")
