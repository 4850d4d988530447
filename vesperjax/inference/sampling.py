"""Autoregressive sampling from a VesperLM with its KV cache.

`generate` prefills the cache with the prompt in one call, then decodes one token per
step. Both steps are jit-compiled once per (model graph, batch, length bucket): the
prompt is right-padded and the cache sized to a multiple of `LENGTH_BUCKET`, and the
sampling settings are traced values, so new prompts, lengths, temperatures, top-k,
top-p or penalties do not recompile. Without `on_token` the whole decode runs as one
`lax.while_loop`; with it the same loop, run in chunks of steps, hands each step's
tokens to the callback from inside the compiled loop (`io_callback`), so streaming costs
no Python dispatch per token.

Random draws use `fold_in(key(seed), step)`, so both paths give the same tokens.

Penalties: `vesperjax.inference.penalties`, applied to each step's logits before sampling.
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from vesperjax.inference.penalties import Penalties, TokenHistory, apply_penalties, check_penalties

LENGTH_BUCKET = 64  # cache lengths and padded prompt lengths are multiples of this


@jax.jit
def sample_logits(logits: jax.Array, rng: jax.Array, temperature=1.0, top_k=0,
                  top_p=1.0) -> jax.Array:
  """Draw one token per row of `logits` [..., V]; returns int32 ids [...].

  temperature 0 is greedy (argmax). Otherwise logits are divided by the temperature,
  then only the `top_k` most likely tokens (0 = all) are kept, then the smallest set
  of those whose renormalised probability reaches `top_p` (the most likely token is
  always kept; tokens tied with the cut-off value are kept too). All three may be
  traced values: changing them does not recompile.
  """
  logits = jnp.asarray(logits, jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)

  def greedy(_):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled = logits / temperature
    filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), _filter_top_k_top_p,
                            lambda s, k, p: s, scaled, top_k, top_p)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw, greedy, None)


def _filter_top_k_top_p(scaled, top_k, top_p):
  """-inf outside the top-k, then top-p, set of each row.

  No sort: XLA's CPU sort of the vocabulary costs far more a token than finding each
  cut-off by bisection over the float bit patterns (32 masked reductions), which is
  exact (docs/benchmarks.md, "Per-op measurements on CPU"). Tokens tied with the k-th
  value are all kept (a sort would break the tie by index).
  """
  vocab = scaled.shape[-1]
  keys = _ordered_key(scaled)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  keep = keys >= _largest_threshold(keys, lambda m: m.sum(-1) >= k)[..., None]
  probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
  # Nucleus: the most likely tokens whose mass reaches top_p = probs >= the largest
  # cut-off whose kept mass is still >= top_p (never above the top token).
  pkeys = jax.lax.bitcast_convert_type(probs, jnp.uint32)  # order-preserving for p >= 0
  cut = _largest_threshold(pkeys, lambda m: jnp.where(m, probs, 0.0).sum(-1) >= top_p)
  keep = keep & (pkeys >= jnp.minimum(cut, pkeys.max(-1))[..., None])
  return jnp.where(keep, scaled, -jnp.inf)


def _ordered_key(x):
  """uint32 keys in the same order as the float32 values."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  bits = bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))  # negative floats: reverse order
  return jax.lax.bitcast_convert_type(bits, jnp.uint32) ^ jnp.uint32(0x80000000)


def _largest_threshold(keys, enough):
  """Per row, the largest t with enough(keys >= t), by bisection over uint32
  (`enough` must hold for t = 0 or the answer is 0: keep everything)."""
  lo = jnp.zeros(keys.shape[:-1], jnp.uint32)
  hi = keys.max(-1) + jnp.uint32(1)

  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = enough(keys >= mid[..., None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _inference_model(graphdef, state):
  model = nnx.merge(graphdef, state, copy=True)  # fresh variables in this trace
  model.eval()  # a copy inside the trace: FlyLoRA routing biases stay fixed
  return model


def _step_key(key, step):
  return jax.random.fold_in(key, step)


def _next(logits, key, step, done, knobs, eos_id, history, penalties):
  """Penalise, sample, then hold finished rows at eos (eos_id < 0: never finish)."""
  temperature, top_k, top_p = knobs
  logits = apply_penalties(logits, history, penalties)
  tok = sample_logits(logits, _step_key(key, step), temperature, top_k, top_p)
  tok = jnp.where(done, eos_id, tok)
  return tok, done | ((tok == eos_id) & (eos_id >= 0)), history.add(tok)


class TokenConfidence(NamedTuple):
  """Per generated token, read at the position that produced it ([B, N] arrays from
  `generate`, [B] for one step in `on_token`)."""
  correct: np.ndarray  # meta head: P(the model's top-1 guess here is the next token)
  end: np.ndarray  # meta head: P(the document ends here: the next token is eod)
  top1_prob: np.ndarray  # the language model's max softmax probability (the baseline)


def _confidence(model, hidden, logits):
  """[B, 3] = TokenConfidence fields of one position: hidden [B, D], logits [B, V]."""
  from vesperjax.model.meta_head import logit_stats, meta_probs
  top1, entropy = logit_stats(logits)
  correct, end = meta_probs(model.meta_logits(hidden, top1, entropy))
  return jnp.stack([correct, end, jnp.exp(top1)], -1)


def _stop_when_confident(tok, done, conf, stop_above, eos_id):
  """Rows whose head puts P(end) above `stop_above` emit eos instead and finish."""
  stop = (conf[:, 1] > stop_above) & ~done
  return jnp.where(stop, eos_id, tok), done | stop


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "confidence"))
def _prefill(graphdef, state, tokens, length, key, knobs, eos_id, penalties, stop_above,
             *, cache_len, confidence=False):
  """Run the (right-padded) prompt through the model, sample the first new token."""
  model = _inference_model(graphdef, state)
  cache = model.init_cache(tokens.shape[0], cache_len)
  hidden, _, cache = model.hidden_states(tokens, cache=cache)
  last = jax.lax.dynamic_slice_in_dim(hidden, length - 1, 1, axis=1)
  logits = model.logits(last)[:, 0]
  # Padding wrote junk keys past `length`; decoding overwrites them before any query
  # can see them (the cache mask only admits keys at positions <= the query's).
  cache = cache._replace(index=jnp.full_like(cache.index, length))
  done = jnp.zeros((tokens.shape[0],), bool)
  history = TokenHistory.of_prompt(tokens, length, logits.shape[-1])
  tok, done, history = _next(logits, key, 0, done, knobs, eos_id, history, penalties)
  conf = jnp.zeros((tokens.shape[0], 3), jnp.float32)
  if confidence:
    conf = _confidence(model, last[:, 0], logits)
    tok, done = _stop_when_confident(tok, done, conf, stop_above, eos_id)
  return tok, done, cache, history, conf


def _decode_one(graphdef, state, cache, tok, step, done, key, knobs, eos_id, history,
                penalties, stop_above, confidence):
  # Merged here, not by the caller: inside a while_loop body the model must belong to
  # the body's trace (hidden_states writes the routing biases back).
  model = _inference_model(graphdef, state)
  hidden, _, cache = model.hidden_states(tok[:, None], cache=cache)
  logits = model.logits(hidden)[:, 0]
  tok, done, history = _next(logits, key, step, done, knobs, eos_id, history, penalties)
  conf = None
  if confidence:
    conf = _confidence(model, hidden[:, 0], logits)
    tok, done = _stop_when_confident(tok, done, conf, stop_above, eos_id)
  return tok, done, cache, history, conf


# on_token of each streaming generate() call, by the id its loop passes to io_callback
# (one compiled loop serves every callback, and concurrent calls stay apart).
_SINKS: dict[int, dict] = {}
_SINK_IDS = itertools.count()
_STREAM_CHUNK = 64  # tokens per compiled call while streaming: Ctrl-C and errors land


def _stream_packet(sink_id, tok, conf):
  """One int32 vector per streamed step: [sink id, B, tok [B], conf [B, 3] as bits if
  the loop computes it]. io_callback copies each operand into a host jax Array (a
  device_put apiece) before the callback runs, so one operand a step costs least."""
  parts = [sink_id[None], jnp.full((1,), tok.shape[0], jnp.int32), tok]
  if conf is not None:
    parts.append(jax.lax.bitcast_convert_type(conf, jnp.int32).reshape(-1))
  return jnp.concatenate(parts)


def _emit(packet):
  packet = np.asarray(packet)
  sink_id, batch = int(packet[0]), int(packet[1])
  sink = _SINKS[sink_id]
  if sink["error"] is None:
    try:
      tok = packet[2:2 + batch].copy()
      if sink["with_confidence"]:
        conf = packet[2 + batch:].view(np.float32).reshape(batch, 3)
        sink["on_token"](tok, TokenConfidence(*conf.T.copy()))
      else:
        sink["on_token"](tok)
    except BaseException as e:  # noqa: BLE001  re-raised by generate() after the chunk
      sink["error"] = e


@functools.partial(jax.jit, static_argnames=("graphdef", "stream", "confidence"),
                   donate_argnames=("cache", "out", "history", "conf_out"))
def _decode_loop(graphdef, state, cache, tok, done, key, knobs, eos_id, out, start,
                 stop, sink_id, history, penalties, stop_above, conf_out, *, stream=False,
                 confidence=False):
  """Steps start..stop-1 in one `lax.while_loop` (stops early once every row is done),
  writing tokens into `out` [B, cache_len]; with `stream`, each step's tokens also go to
  the running generate()'s on_token as they are sampled. With `confidence`, the meta
  head's TokenConfidence goes into `conf_out` [B, cache_len, 3] (and to on_token) and
  rows stop once its P(end) exceeds `stop_above`."""

  def cond(carry):
    step, _, done, _, _, _, _ = carry
    return (step < stop) & ~jnp.all(done)

  def body(carry):
    step, tok, done, cache, out, history, conf_out = carry
    tok, done, cache, history, conf = _decode_one(graphdef, state, cache, tok, step, done,
                                                  key, knobs, eos_id, history, penalties,
                                                  stop_above, confidence)
    if confidence:
      conf_out = conf_out.at[:, step].set(conf)
    if stream:
      io_callback(_emit, None, _stream_packet(sink_id, tok, conf), ordered=True)
    return step + 1, tok, done, cache, out.at[:, step].set(tok), history, conf_out

  return jax.lax.while_loop(cond, body, (start, tok, done, cache, out, history, conf_out))


def _as_prompt(prompt_tokens) -> np.ndarray:
  arr = np.asarray(prompt_tokens)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
    raise ValueError(f"prompt_tokens must be a non-empty list of ints or an int array "
                     f"[batch, length]; got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"prompt_tokens must be integers, got dtype {arr.dtype}")
  return arr.astype(np.int32)


def generate(model, prompt_tokens: Sequence[int] | np.ndarray, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None,
             on_token: Callable[[np.ndarray], None] | None = None,
             repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, with_confidence: bool = False,
             stop_when_confident: float | None = None):
  """Sample up to `max_new_tokens` continuations of `prompt_tokens` ([B, P] or a list).

  Returns the new ids [B, N], N <= max_new_tokens (fewer only when every row produced
  `eos_id`; a row that ended early is padded with `eos_id`, the eos itself included).
  `on_token(ids [B])` is called with each step's tokens as soon as they exist.
  Prompt + new tokens must fit in `model.config.max_seq_len`: callers that want the
  newest context instead should truncate the prompt from the left (the CLI does).
  Runs the model in inference mode (routing biases frozen) without changing `model`.
  `repetition_penalty` (> 0, 1 = off), `frequency_penalty` and `presence_penalty`
  (0 = off) act on the logits before temperature, as `apply_penalties` says.

  Models with the metacognition head (`config.meta_head`, docs/metacognition.md):
  `with_confidence=True` returns `(ids, TokenConfidence)` ([B, N] arrays) and calls
  `on_token(ids [B], TokenConfidence of [B])`. `stop_when_confident=P` in (0, 1) ends a
  row (its next token becomes `eos_id`, which is then required) at the first position
  where the head's P(end of document) exceeds P.
  """
  prompt = _as_prompt(prompt_tokens)
  cfg = model.config
  batch, length = prompt.shape
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
  if length + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
        f"model's max_seq_len ({cfg.max_seq_len}); shorten the prompt or ask for fewer "
        f"tokens")
  if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
    raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size}); got "
                     f"[{prompt.min()}, {prompt.max()}]")
  if not temperature >= 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  check_penalties(repetition_penalty, frequency_penalty, presence_penalty)
  confidence = bool(with_confidence) or stop_when_confident is not None
  if confidence and not cfg.meta_head:
    raise ValueError("per-token confidence and stop_when_confident need a model with the "
                     "metacognition head (trained with model.meta_head=True)")
  if stop_when_confident is not None:
    if not 0 < stop_when_confident < 1:
      raise ValueError(f"stop_when_confident must be a probability in (0, 1), got "
                       f"{stop_when_confident}")
    if eos_id is None:
      raise ValueError("stop_when_confident needs eos_id: a stopped row emits it")
  stop_above = jnp.float32(2.0 if stop_when_confident is None else stop_when_confident)

  def bucket(n):
    return min(cfg.max_seq_len, -(-n // LENGTH_BUCKET) * LENGTH_BUCKET)

  cache_len = bucket(length + max_new_tokens)
  padded = np.zeros((batch, min(bucket(length), cache_len)), np.int32)
  padded[:, :length] = prompt

  graphdef, state = nnx.split(model)
  knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  key = jax.random.key(seed)
  penalties = Penalties.of(repetition_penalty, frequency_penalty, presence_penalty)
  tok, done, cache, history, conf = _prefill(
      graphdef, state, jnp.asarray(padded), jnp.int32(length), key, knobs, eos, penalties,
      stop_above, cache_len=cache_len, confidence=confidence)

  # Without on_token, one call runs every step. Streaming: tokens reach on_token from
  # inside the compiled loop as they are sampled (no Python dispatch per token), in calls
  # of _STREAM_CHUNK steps.
  out = jnp.zeros((batch, cache_len), jnp.int32).at[:, 0].set(tok)
  conf_out = jnp.zeros((batch, cache_len if confidence else 1, 3)).at[:, 0].set(conf)
  stream = on_token is not None
  chunk = _STREAM_CHUNK if stream else max_new_tokens
  sink_id = next(_SINK_IDS) % 2**31
  host_done = np.asarray(done)
  if stream:
    if with_confidence:
      on_token(np.asarray(tok), TokenConfidence(*np.asarray(conf).T))
    else:
      on_token(np.asarray(tok))
    _SINKS[sink_id] = sink = {"on_token": on_token, "error": None,
                              "with_confidence": bool(with_confidence)}
  steps = 1
  try:
    while steps < max_new_tokens and not host_done.all():
      step, tok, done, cache, out, history, conf_out = _decode_loop(
          graphdef, state, cache, tok, done, key, knobs, eos, out, jnp.int32(steps),
          jnp.int32(min(steps + chunk, max_new_tokens)), jnp.int32(sink_id), history,
          penalties, stop_above, conf_out, stream=stream, confidence=confidence)
      steps, host_done = int(step), np.asarray(done)
      if stream and sink["error"] is not None:
        raise sink["error"]
  finally:
    _SINKS.pop(sink_id, None)
  if with_confidence:
    return (np.asarray(out[:, :steps]),
            TokenConfidence(*np.moveaxis(np.asarray(conf_out[:, :steps]), -1, 0)))
  return np.asarray(out[:, :steps])
