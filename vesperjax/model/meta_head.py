"""The metacognition head: per position, how sure the model is and whether the text ends.

`MetaHead` reads the final-norm hidden state of a position plus two numbers the LM head
already yields there (the log-probability of its top-1 guess and its predictive
entropy, both scaled by 1 / ln V) and outputs the logits of two events:

  correct  the model's own top-1 next-token guess is the actual next token
  end      the next token is the end-of-document token (the tokenizer's eod id, which
           the data pipeline writes after every document)

Both are trained with a binary cross-entropy (`meta_loss`), added to the language-model
loss with weight `ModelConfig.meta_weight`. The targets never carry gradient; the hidden
states reach the head through a stop_gradient unless `ModelConfig.meta_trunk_grad`.
docs/metacognition.md has the design, its cost and its calibration.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vesperjax.config import ModelConfig
from vesperjax.model.layers import param

EVENTS = ("correct", "end")  # the order of the head's outputs on the last axis


def meta_width(hidden_size: int) -> int:
  """The head's hidden layer: a quarter of the model's width (at least 16)."""
  return max(16, hidden_size // 4)


def meta_head_params(hidden_size: int) -> int:
  """Parameters of a MetaHead on a model of width `hidden_size`."""
  m = meta_width(hidden_size)
  return (hidden_size + 2) * m + m + m * len(EVENTS) + len(EVENTS)


class MetaHead(nnx.Module):
  """Two-layer MLP (GELU) from [hidden, top-1 log-prob, entropy] to the events' logits.

  The output layer starts at zero, so a fresh head says 0.5 for both events and
  leaves the language model's first steps as they would be without it.
  """

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, m = config.hidden_size, meta_width(config.hidden_size)
    self.log_vocab = math.log(config.vocab_size)
    self.w_in = param(rngs, (d + 2, m), (None, None), config.init_std)
    self.b_in = param(rngs, (m,), (None,), None)
    self.w_out = param(rngs, (m, len(EVENTS)), (None, None), None)
    self.b_out = param(rngs, (len(EVENTS),), (None,), None)

  def __call__(self, hidden: jax.Array, top1_logprob: jax.Array,
               entropy: jax.Array) -> jax.Array:
    """hidden [..., D], top1_logprob and entropy [...] -> event logits [..., 2] fp32."""
    stats = jnp.stack([top1_logprob, entropy], -1).astype(jnp.float32) / self.log_vocab
    x = jnp.concatenate([hidden.astype(jnp.float32), stats], -1)
    x = jax.nn.gelu(x @ self.w_in[...] + self.b_in[...])
    return x @ self.w_out[...] + self.b_out[...]


def logit_stats(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(top-1 log-probability, entropy in nats) of each row of `logits` [..., V]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  entropy = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), -1)
  return logp.max(-1), entropy


def meta_targets(token_loss: jax.Array, top1_logprob: jax.Array, targets: jax.Array,
                 eod_id: int) -> tuple[jax.Array, jax.Array]:
  """The events as 0/1 floats, without gradient.

  correct: the target's log-probability (-token_loss) is the largest one, that is the
  target's logit is the maximum (the argmax, up to exact ties). end: target == eod_id
  (never, for eod_id < 0).
  """
  correct = (-token_loss >= top1_logprob).astype(jnp.float32)
  end = ((targets == eod_id) & (eod_id >= 0)).astype(jnp.float32)
  return jax.lax.stop_gradient(correct), end


def meta_loss(meta_logits: jax.Array, correct: jax.Array, end: jax.Array) -> dict:
  """Mean binary cross-entropy of each event (summed: `meta_loss`) and the accuracy
  of each event's prediction thresholded at probability 0.5."""
  logits = meta_logits.reshape(-1, len(EVENTS))
  labels = jnp.stack([correct.reshape(-1), end.reshape(-1)], -1)
  # softplus(x) - x * y: the stable form of -y log s(x) - (1 - y) log(1 - s(x))
  bce = (jax.nn.softplus(logits) - logits * labels).mean(0)
  hits = ((logits > 0) == (labels > 0.5)).astype(jnp.float32).mean(0)
  return {"meta_loss": bce.sum(), "meta_correct_bce": bce[0], "meta_end_bce": bce[1],
          "meta_correct_acc": hits[0], "meta_end_acc": hits[1]}


def meta_probs(meta_logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(P(top-1 guess correct), P(document ends next)) from the head's logits."""
  p = jax.nn.sigmoid(meta_logits.astype(jnp.float32))
  return p[..., 0], p[..., 1]
