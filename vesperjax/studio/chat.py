"""Chat: one model loaded at a time (the run and checkpoint last asked for), kept between
prompts, streaming its text as tokens are sampled."""
from __future__ import annotations

import io
import threading
import time
from typing import Callable

from vesperjax.studio import runs
from vesperjax.studio.paths import BadRequest


def sampling_options(form: dict) -> dict:
  """temperature / top-k / top-p / max tokens / seed of a chat request, checked."""
  def number(key, default, kind, ok, why):
    value = form.get(key, default)
    try:
      value = kind(value)
    except (TypeError, ValueError):
      raise BadRequest(f"{key}: {value!r} is not a number") from None
    if not ok(value):
      raise BadRequest(f"{key}: {value!r} {why}")
    return value

  return dict(
      temperature=number("temperature", 0.8, float, lambda x: 0 <= x <= 10,
                         "must be in [0, 10] (0: greedy)"),
      top_k=number("top_k", 40, int, lambda x: x >= 0, "must be >= 0 (0: off)"),
      top_p=number("top_p", 0.95, float, lambda x: 0 < x <= 1, "must be in (0, 1]"),
      max_new_tokens=number("max_tokens", 100, int, lambda x: 1 <= x <= 4096,
                            "must be from 1 to 4096"),
      seed=number("seed", 0, int, lambda x: x >= 0, "must be >= 0"))


class Chat:
  """`stream(workdir, checkpoint, prompt, on_text, **options)` (blocking: run it in a
  worker thread); one generation at a time."""

  def __init__(self):
    self._lock = threading.Lock()
    self._key = None
    self._model = self._tokenizer = None

  def _load(self, workdir: str, checkpoint: str):
    key = (workdir, checkpoint, _newest(workdir, checkpoint))
    if key != self._key:
      from vesperjax.build import load_model
      self._model = self._tokenizer = self._key = None  # free the old one first
      model, tokenizer, _ = load_model(workdir, None, best=checkpoint == "best")
      self._model, self._tokenizer, self._key = model, tokenizer, key
    return self._model, self._tokenizer

  def stream(self, workdir: str, checkpoint: str, prompt: str,
             on_text: Callable[[str], None], **options) -> dict:
    """Generates a continuation of `prompt`, calling `on_text(delta)` as text appears;
    returns {tokens, seconds, step}."""
    from vesperjax.generate import TextStream, fit_prompt
    from vesperjax.sampling import generate
    if checkpoint not in ("latest", "best"):
      raise BadRequest(f"checkpoint: {checkpoint!r} is not latest or best")
    if _newest(workdir, checkpoint) is None:
      raise BadRequest(f"this run has no {checkpoint} checkpoint yet", status=409)
    if not isinstance(prompt, str) or not prompt:
      raise BadRequest("prompt: write something to continue")
    with self._lock:
      model, tokenizer = self._load(workdir, checkpoint)
      ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
      ids = fit_prompt(ids, options["max_new_tokens"], model.config.max_seq_len)
      text = TextStream(tokenizer, out=io.StringIO())
      start = time.perf_counter()

      def on_token(t, *_):
        delta = text.push(t[0])
        if delta:
          on_text(delta)

      out = generate(model, [ids], eos_id=tokenizer.eod_id, on_token=on_token, **options)
      tail = text.finish()
      if tail:
        on_text(tail)
      return dict(tokens=int(out.shape[1]), seconds=time.perf_counter() - start,
                  step=self._key[2])


def _newest(workdir: str, checkpoint: str) -> int | None:
  """The step a checkpoint choice loads now (a new save reloads the model)."""
  steps = runs.checkpoints(workdir, "best" if checkpoint == "best" else "checkpoints")
  return steps[-1] if steps else None
