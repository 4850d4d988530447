"""Velvet's rules: how the step's loss and entropy become ``lr_t`` and ``b1_t``.

Two presets of one ``VelvetRules``:

``ORIGINAL`` (``rules="original"``), the original optimizer bit for bit: each batch's
own loss ``L`` and entropy ``H`` (nats) give::

  es   = clip((min(H, ln V) / ln V) / 0.5, 0.7, 1.3)     lr_t = lr * es
  ps   = clip(40 / max(exp(min(L, 20)), 1), 0.7, 1.3)    b1_t = clip(b1 * ps, 0.5, 0.999)
  m_hat = m / (1 - b1_t^t)

``CORRECTED`` (``rules="corrected"``) changes four things, each measured on its own
(docs/velvet.md, benchmarks/optimizers-study):

* ``bias_correction="product"``: ``m_hat = m / (1 - prod_{i<=t} b1_i)``. With
  ``m_t = b1_t m_{t-1} + (1 - b1_t) g_t`` the weights of the gradients sum to
  ``1 - prod_i b1_i``; dividing by ``1 - b1_t^t`` instead scales a step up whenever b1
  jumps (by up to 3.8x at the original's 0.999 cap). PyTorch's NAdam keeps the same
  running product (its ``mu_product``).
* ``signal_decay``: the rules read exponential moving averages of the loss and entropy
  (debiased, as Adam's moments), not each batch's value, so b1 and the lr do not
  flicker with batch noise.
* ``perplexity_signal="trend"``: the perplexity rule's target is the run's own recent
  perplexity instead of the absolute 40, ``ps = clip(exp(L_slow - L_fast), 0.7, 1.3)``
  (``L_fast``, ``L_slow``: the loss's averages over ~1/(1 - signal_decay) and
  ~1/(1 - trend_decay) steps): b1 rises while the loss falls and returns to ``b1`` as it
  flattens, whatever the loss's absolute scale (tokenizer, corpus, model size).
* ``b1_rule="horizon"``: the scale acts on the momentum horizon ``1/(1 - b1)``, not on
  b1: ``b1_t = 1 - (1 - b1) / ps``, clipped to ``[b1_min, b1_max]``, so the same ps moves
  b1 = 0.9 within [0.857, 0.923] rather than to 0.999.

A non-finite or missing signal gives neutral scales (1) in every preset; a moving
average skips non-finite values.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

SCALE_MIN = 0.7
SCALE_MAX = 1.3
ENTROPY_TARGET = 0.5
PERPLEXITY_TARGET = 40.0
MAX_LOG_PERPLEXITY = 20.0
B1_MIN = 0.5
B1_MAX = 0.999
PERPLEXITY_SIGNALS = ("absolute", "trend")
B1_RULES = ("beta", "horizon")
BIAS_CORRECTIONS = ("step", "product")


@dataclasses.dataclass(frozen=True)
class VelvetRules:
  """How Velvet's two rules read the training signal (static: part of the trace)."""
  signal_decay: float = 0.0  # EMA decay of loss / entropy (0: each batch's value)
  perplexity_signal: str = "absolute"  # "absolute" (target 40) | "trend" (own average)
  trend_decay: float = 0.995  # "trend": EMA decay of the slow loss average
  b1_rule: str = "beta"  # "beta": b1 * ps | "horizon": 1 - (1 - b1) / ps
  b1_min: float = B1_MIN
  b1_max: float = B1_MAX
  bias_correction: str = "step"  # "step": 1 - b1_t^t | "product": 1 - prod b1_i

  def __post_init__(self):
    def need(ok, what):
      if not ok:
        raise ValueError(f"VelvetRules: {what}")
    need(0.0 <= self.signal_decay < 1.0, f"signal_decay {self.signal_decay} not in [0, 1)")
    need(0.0 <= self.trend_decay < 1.0, f"trend_decay {self.trend_decay} not in [0, 1)")
    need(self.perplexity_signal in PERPLEXITY_SIGNALS,
         f"perplexity_signal {self.perplexity_signal!r} not in {PERPLEXITY_SIGNALS}")
    need(self.b1_rule in B1_RULES, f"b1_rule {self.b1_rule!r} not in {B1_RULES}")
    need(self.bias_correction in BIAS_CORRECTIONS,
         f"bias_correction {self.bias_correction!r} not in {BIAS_CORRECTIONS}")
    need(0.0 <= self.b1_min <= self.b1_max < 1.0,
         f"need 0 <= b1_min ({self.b1_min}) <= b1_max ({self.b1_max}) < 1")


ORIGINAL = VelvetRules()
CORRECTED = VelvetRules(signal_decay=0.98, perplexity_signal="trend", trend_decay=0.995,
                        b1_rule="horizon", b1_max=0.99, bias_correction="product")
PRESETS = {"original": ORIGINAL, "corrected": CORRECTED}


def resolve_rules(rules: str | VelvetRules) -> VelvetRules:
  """A ``VelvetRules`` as is, a preset name ("original" | "corrected"), or a preset with
  fields replaced: ``"original:bias_correction=product,b1_max=0.95"`` (the benchmark's
  one-cause arms and ``config.optim.velvet_rules`` use that form)."""
  if isinstance(rules, VelvetRules):
    return rules
  name, _, changes = str(rules).partition(":")
  if name not in PRESETS:
    raise ValueError(f"Velvet: rules={rules!r}; expected one of {list(PRESETS)} (or "
                     "'PRESET:field=value,...') or a VelvetRules")
  fields = {f.name: f.type for f in dataclasses.fields(VelvetRules)}
  replace = {}
  for item in filter(None, changes.split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or key not in fields:
      raise ValueError(f"Velvet: rules={rules!r}: {item!r} is not FIELD=VALUE with a "
                       f"field of {sorted(fields)}")
    replace[key] = value.strip() if fields[key] == "str" else _number(rules, value)
  return dataclasses.replace(PRESETS[name], **replace)


def _number(rules, value: str) -> float:
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"Velvet: rules={rules!r}: {value!r} is not a number") from None


class SignalState(NamedTuple):
  """Moving averages of the signals: [loss fast, loss slow, entropy fast], each with its
  total weight (1 - decay^n over the n finite values seen), so ``ema / weight`` is
  debiased and a zero weight means no value yet."""
  ema: jax.Array  # f32[3]
  weight: jax.Array  # f32[3]


def init_signals() -> SignalState:
  return SignalState(ema=jnp.zeros([3], jnp.float32), weight=jnp.zeros([3], jnp.float32))


class Signals(NamedTuple):
  """The step's rule inputs (fp32 scalars) and whether each exists and is finite."""
  loss: jax.Array
  loss_slow: jax.Array
  entropy: jax.Array
  loss_ok: jax.Array
  entropy_ok: jax.Array


def _scalar(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  if x.ndim != 0:
    raise ValueError(f"Velvet: `{name}` must be a scalar (the step's mean), "
                     f"got shape {x.shape}.")
  return x


def track_signals(state: SignalState, loss: Optional[Any], entropy: Optional[Any],
                  rules: VelvetRules) -> tuple[SignalState, Signals]:
  """Fold this step's loss and entropy into the averages; the values the rules read.

  With ``signal_decay=0`` the fast averages are the batch's own values exactly. The
  entropy counts only where the loss is finite too (a non-finite loss makes both
  rules neutral).
  """
  one = jnp.ones([], bool)
  zero = jnp.zeros([], jnp.float32)
  loss_v = zero if loss is None else _scalar(loss, "loss")
  ent_v = zero if entropy is None else _scalar(entropy, "entropy")
  loss_ok = ~one if loss is None else jnp.isfinite(loss_v)
  # no loss= at all: the entropy alone may drive its rule (a non-finite loss stops it)
  ent_ok = ~one if entropy is None else jnp.isfinite(ent_v) & (
      one if loss is None else loss_ok)
  x = jnp.stack([loss_v, loss_v, ent_v])
  ok = jnp.stack([loss_ok, loss_ok, ent_ok])
  decay = jnp.asarray([rules.signal_decay, rules.trend_decay, rules.signal_decay],
                      jnp.float32)
  ema = jnp.where(ok, decay * state.ema + (1 - decay) * jnp.where(ok, x, 0.0), state.ema)
  weight = jnp.where(ok, decay * state.weight + (1 - decay), state.weight)
  mean = ema / jnp.where(weight > 0, weight, 1.0)
  return SignalState(ema, weight), Signals(mean[0], mean[1], mean[2], loss_ok, ent_ok)


def entropy_scale(s: Signals, vocab_size: Any, use_loss: bool) -> jax.Array:
  """``es = clip((min(S, ln V) / ln V) / 0.5, 0.7, 1.3)``, S the entropy (the loss
  when ``use_loss``: no entropy was given); 1 without a finite signal."""
  signal, ok = (s.loss, s.loss_ok) if use_loss else (s.entropy, s.entropy_ok)
  log_v = jnp.log(jnp.asarray(vocab_size, jnp.float32))
  raw = (jnp.minimum(signal, log_v) / log_v) / ENTROPY_TARGET
  return jnp.where(ok, jnp.clip(raw, SCALE_MIN, SCALE_MAX), 1.0)


def perplexity_scale(s: Signals, rules: VelvetRules) -> jax.Array:
  """``ps``: the absolute rule ``clip(40 / max(exp(min(L, 20)), 1))`` or the trend
  ``clip(exp(L_slow - L_fast))``, in [0.7, 1.3]; 1 without a finite loss."""
  if rules.perplexity_signal == "trend":
    raw = jnp.exp(jnp.clip(s.loss_slow - s.loss, -1.0, 1.0))
  else:
    raw = PERPLEXITY_TARGET / jnp.maximum(
        jnp.exp(jnp.minimum(s.loss, MAX_LOG_PERPLEXITY)), 1.0)
  return jnp.where(s.loss_ok, jnp.clip(raw, SCALE_MIN, SCALE_MAX), 1.0)


def adapted_b1(b1: Any, perplexity_scale: jax.Array, perplexity_guided: bool = True,
               rules: VelvetRules = ORIGINAL) -> jax.Array:
  """``b1_t``: ``clip(b1 * ps)`` ("beta") or ``clip(1 - (1 - b1) / ps)`` ("horizon"),
  clipped to [b1_min, b1_max]; ``b1`` as is when not perplexity-guided (so Velvet with
  both rules off is AdamW exactly)."""
  b1 = jnp.asarray(b1, jnp.float32)
  if not perplexity_guided:
    return b1
  raw = b1 * perplexity_scale if rules.b1_rule == "beta" else (
      1 - (1 - b1) / perplexity_scale)
  return jnp.clip(raw, rules.b1_min, rules.b1_max)


def first_moment_correction(b1_t: jax.Array, count: jax.Array, b1_product: jax.Array,
                            rules: VelvetRules) -> tuple[jax.Array, jax.Array]:
  """``(1 - b1_t^t or 1 - prod_i b1_i, the new running product)``; ``count`` is t."""
  product = b1_product * b1_t
  if rules.bias_correction == "product":
    return 1 - product, product
  return 1 - b1_t ** jnp.asarray(count, jnp.float32), product
