"""Chat: one model loaded at a time (the run and checkpoint last asked for), kept between
prompts, streaming its text as tokens are sampled."""
from __future__ import annotations

import io
import threading
import time
from typing import Callable

from vesperjax.studio import runs
from vesperjax.studio.forms import as_float, as_int
from vesperjax.studio.paths import BadRequest, shown

MAX_PROMPT_CHARS = 100_000


def sampling_options(form: dict) -> dict:
  """temperature / top-k / top-p / max tokens / seed of a chat request, checked: finite,
  in range, and whole where a count is meant (1.9 tokens is refused, not cut to 1)."""
  return dict(
      temperature=as_float(form.get("temperature", 0.8), "temperature",
                           lambda x: 0 <= x <= 10, "must be in [0, 10] (0: greedy)"),
      top_k=as_int(form.get("top_k", 40), "top_k", 0, 1 << 20),
      top_p=as_float(form.get("top_p", 0.95), "top_p", lambda x: 0 < x <= 1,
                     "must be in (0, 1]"),
      max_new_tokens=as_int(form.get("max_tokens", 100), "max_tokens", 1, 4096),
      seed=as_int(form.get("seed", 0), "seed", 0, (1 << 32) - 1))


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
      from vesperjax.inference.loading import load_model
      self._model = self._tokenizer = self._key = None  # free the old one first
      model, tokenizer, _ = load_model(workdir, None, best=checkpoint == "best")
      self._model, self._tokenizer, self._key = model, tokenizer, key
    return self._model, self._tokenizer

  def stream(self, workdir: str, checkpoint: str, prompt: str,
             on_text: Callable[[str], None], **options) -> dict:
    """Generates a continuation of `prompt`, calling `on_text(delta)` as text appears;
    returns {tokens, seconds, step}."""
    from vesperjax.generate import TextStream, fit_prompt
    from vesperjax.inference.sampling import generate
    if checkpoint not in ("latest", "best"):
      raise BadRequest(f"checkpoint: {shown(checkpoint)} is not latest or best")
    if _newest(workdir, checkpoint) is None:
      raise BadRequest(f"this run has no {checkpoint} checkpoint yet", status=409)
    if not isinstance(prompt, str) or not prompt:
      raise BadRequest("prompt: write something to continue")
    if len(prompt) > MAX_PROMPT_CHARS:
      raise BadRequest(f"prompt: at most {MAX_PROMPT_CHARS} characters")
    # the model loader opens the run's files (config.json, tokenizer.json, checkpoints)
    runs.refuse_links_out(workdir)
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
