"""`python -m vesperjax.generate --workdir RUN --prompt "def " [--max-tokens 100] ...`.

Loads a run's model, tokenizer and checkpoint (latest, `--step N`, or `--best`), or an
exported model (`--model DIR`, written by `python -m vesperjax.export`), and
streams the continuation of each prompt to stdout as it is sampled, stopping at the
tokenizer's end-of-document token or after --max-tokens. A prompt too long for the
model keeps its newest tokens (truncated from the left, with a note on stderr). Bad
input ends with one `error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import os
import sys
import time

from absl import flags

from vesperjax.cli import one_line, run_cli, use_compilation_cache, user_errors

# Own FlagValues: the train and benchmark CLIs define flags of the same names, and
# tests import them all into one process.
FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by vesperjax.train.",
                               flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "Folder written by `python -m vesperjax.export` "
                             "(instead of --workdir).", flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                             flag_values=FLAGS)
_BEST = flags.DEFINE_bool("best", False, "Use the checkpoint with the lowest eval loss.",
                          flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.", flag_values=FLAGS)
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts-file", None, "File with one prompt per line (blank lines skipped); each "
    "is continued in turn.", flag_values=FLAGS)
_MAX_TOKENS = flags.DEFINE_integer("max-tokens", 100, "Most new tokens per prompt.",
                                   flag_values=FLAGS)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0: greedy).",
                                  flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top-k", 0, "Keep the k most likely tokens (0: all).",
                              flag_values=FLAGS)
_TOP_P = flags.DEFINE_float("top-p", 0.95, "Nucleus sampling mass (1: off).",
                            flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=FLAGS)
_SHOW_CONFIDENCE = flags.DEFINE_bool(
    "show-confidence", False, "After each continuation, print a table of its tokens "
    "with the metacognition head's P(top-1 guess correct), P(end of document) and the "
    "max softmax probability, to stderr (needs a model trained with model.meta_head).",
    flag_values=FLAGS)
_STOP_WHEN_CONFIDENT = flags.DEFINE_float(
    "stop-when-confident", None, "End a continuation at the first position where the "
    "metacognition head's P(end of document) exceeds this probability in (0, 1) "
    "(docs/metacognition.md).", flag_values=FLAGS)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", None, ["int8", "int4"], "Weight-only, per-channel quantization of the "
    "attention and FFN weights with qwix (vesperjax.inference.quantize; needs "
    "'vesperjax[quantize]').", flag_values=FLAGS)
_REPETITION_PENALTY = flags.DEFINE_float(
    "repetition-penalty", 1.0, "Divide the logit of every token already in the prompt "
    "or the output by this if positive, multiply it if negative (> 0; 1: off). Off by "
    "default so output follows the model's own distribution: the rule depends on a "
    "logit's sign, which softmax ignores, and it hits every prompt token, whitespace and "
    "punctuation included. The original VesperLM generate.py uses 1.1.",
    flag_values=FLAGS)
_FREQUENCY_PENALTY = flags.DEFINE_float(
    "frequency-penalty", 0.0, "Subtract this times the number of times a token was "
    "generated so far from its logit (OpenAI's definition; 0: off).", flag_values=FLAGS)
_PRESENCE_PENALTY = flags.DEFINE_float(
    "presence-penalty", 0.0, "Subtract this from the logit of every token generated so "
    "far (OpenAI's definition; 0: off).", flag_values=FLAGS)


class TextStream:
  """Turns a growing list of token ids into printable text deltas.

  Byte-level BPE tokens can end inside a UTF-8 character; the decoder shows that as
  U+FFFD, so a delta ending in it is held back until the next token completes it.
  """

  def __init__(self, tokenizer, out=None):
    self.tokenizer, self.out = tokenizer, out or sys.stdout
    self.ids: list[int] = []
    self.printed = ""

  def push(self, token_id: int) -> str:
    self.ids.append(int(token_id))
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if text.endswith("\ufffd"):
      return ""
    delta = text[len(self.printed):] if text.startswith(self.printed) else text
    self.printed = text
    self.out.write(delta)
    self.out.flush()
    return delta

  def finish(self) -> str:
    """Whatever was held back (an incomplete character at the very end)."""
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    delta = text[len(self.printed):] if text.startswith(self.printed) else ""
    self.out.write(delta)
    self.out.flush()
    self.printed = text
    return delta


def _prompts() -> list[str]:
  if _PROMPT.value is not None and _PROMPTS_FILE.value is not None:
    raise ValueError("give --prompt or --prompts-file, not both")
  if _PROMPTS_FILE.value is not None:
    path = _PROMPTS_FILE.value
    if not os.path.isfile(path):
      raise ValueError(f"--prompts-file {path}: no such file")
    with open(path, encoding="utf-8", errors="strict") as f:
      try:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
      except UnicodeDecodeError:
        raise ValueError(f"--prompts-file {path}: not UTF-8 text") from None
    if not prompts:
      raise ValueError(f"--prompts-file {path}: no prompts (every line is blank)")
    return prompts
  if _PROMPT.value is None:
    raise ValueError("give --prompt TEXT (or --prompts-file FILE)")
  return [_PROMPT.value]


def _load(workdir: str, step: int | None, best: bool):
  """(model, tokenizer, RunConfig or None) from --workdir, or from --model (an export)."""
  from vesperjax.inference.loading import load_model
  from vesperjax.checkpoint import CheckpointError
  if _MODEL.value is not None:
    from vesperjax.inference.pretrained import load_pretrained
    if workdir:
      raise ValueError("give --model DIR or --workdir RUN, not both")
    if step is not None or best:
      raise ValueError("--step and --best choose a checkpoint of --workdir; an export "
                       "(--model) holds one")
    return (*load_pretrained(_MODEL.value), None)
  if not workdir:
    raise ValueError("--workdir RUN (a directory written by vesperjax.train) or --model "
                     "DIR (one written by vesperjax.export) is required")
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir}: no such directory")
  if step is not None and step < 0:
    raise ValueError(f"--step {step}: must be >= 0")
  try:  # the step read goes to stderr: a running trainer's checkpoints rotate
    return load_model(workdir, step, best=best,
                      log=lambda line: print(line, file=sys.stderr, flush=True))
  except user_errors():
    raise
  except Exception as e:  # orbax/tensorstore on a damaged or foreign directory
    raise CheckpointError(f"cannot load a checkpoint from {workdir}: {one_line(e)}") from None


def fit_prompt(ids: list[int], max_new_tokens: int, max_seq_len: int) -> list[int]:
  """The newest tokens of `ids` that leave room for max_new_tokens."""
  room = max_seq_len - max_new_tokens
  if room < 1:
    raise ValueError(f"--max-tokens {max_new_tokens} leaves no room for a prompt in the "
                     f"model's max_seq_len of {max_seq_len}")
  return ids[-room:]


def _check_penalty_flags() -> None:
  import math
  rep = _REPETITION_PENALTY.value
  if not (math.isfinite(rep) and rep > 0):
    raise ValueError(f"--repetition-penalty {rep}: must be a finite number > 0 (1: off)")
  for flag in (_FREQUENCY_PENALTY, _PRESENCE_PENALTY):
    if not math.isfinite(flag.value):
      raise ValueError(f"--{flag.name} {flag.value}: must be a finite number (0: off)")


def print_confidence(rows, tokenizer, out=None) -> None:
  """One line per generated token: its text and the TokenConfidence it was sampled with
  (`vesperjax.inference.sampling.TokenConfidence`: the head's P(correct), P(end), max softmax)."""
  out = out or sys.stderr
  out.write(f"\n{'#':>4}  {'token':<16} {'P(correct)':>10} {'P(end)':>8} {'max p':>7}\n")
  for i, (tok, correct, end, top1) in enumerate(rows):
    text = repr(tokenizer.decode([tok], skip_special_tokens=False))[:16]
    out.write(f"{i:>4}  {text:<16} {correct:>10.3f} {end:>8.3f} {top1:>7.3f}\n")
  out.flush()


def run() -> int:
  from vesperjax.inference.sampling import generate

  prompts = _prompts()
  if _MAX_TOKENS.value < 1:
    raise ValueError(f"--max-tokens {_MAX_TOKENS.value}: must be >= 1")
  if not _TEMPERATURE.value >= 0:
    raise ValueError(f"--temperature {_TEMPERATURE.value}: must be >= 0")
  if _TOP_K.value < 0:
    raise ValueError(f"--top-k {_TOP_K.value}: must be >= 0 (0: off)")
  if not 0 < _TOP_P.value <= 1:
    raise ValueError(f"--top-p {_TOP_P.value}: must be in (0, 1]")
  _check_penalty_flags()
  stop_p = _STOP_WHEN_CONFIDENT.value
  if stop_p is not None and not 0 < stop_p < 1:
    raise ValueError(f"--stop-when-confident {stop_p}: must be a probability in (0, 1)")
  use_compilation_cache()
  if _QUANTIZE.value:  # before loading: a missing qwix is one error line, at once
    from vesperjax.inference.quantize import require_qwix
    require_qwix()
  model, tokenizer, _ = _load(_WORKDIR.value, _STEP.value, _BEST.value)
  if _QUANTIZE.value:
    from vesperjax.inference.quantize import quantize_for_inference
    model = quantize_for_inference(model, _QUANTIZE.value)
  confidence = _SHOW_CONFIDENCE.value or stop_p is not None
  if confidence and not model.config.meta_head:
    flag = "--show-confidence" if _SHOW_CONFIDENCE.value else "--stop-when-confident"
    raise ValueError(f"{flag} needs a model with the metacognition head; this one was "
                     "trained without it (--config.model.meta_head=True)")
  max_len = model.config.max_seq_len
  for i, text in enumerate(prompts):
    ids = tokenizer.encode(text) or [tokenizer.eod_id]
    fitted = fit_prompt(ids, _MAX_TOKENS.value, max_len)
    if len(fitted) < len(ids):
      print(f"note: prompt truncated to its last {len(fitted)} of {len(ids)} tokens "
            f"(max_seq_len {max_len})", file=sys.stderr)
    if i:
      sys.stdout.write("\n\n")
    sys.stdout.write(text)
    sys.stdout.flush()
    stream = TextStream(tokenizer)
    times = []

    token_confidence = []

    def on_token(t, conf=None):
      times.append(time.perf_counter())
      stream.push(t[0])
      if conf is not None:
        token_confidence.append((int(t[0]), *(float(x[0]) for x in conf)))

    start = time.perf_counter()
    out = generate(model, [fitted], max_new_tokens=_MAX_TOKENS.value,
                   temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                   seed=_SEED.value + i, eos_id=tokenizer.eod_id, on_token=on_token,
                   repetition_penalty=_REPETITION_PENALTY.value,
                   frequency_penalty=_FREQUENCY_PENALTY.value,
                   presence_penalty=_PRESENCE_PENALTY.value,
                   with_confidence=_SHOW_CONFIDENCE.value, stop_when_confident=stop_p)
    if _SHOW_CONFIDENCE.value:
      out = out[0]
    stream.finish()
    if _SHOW_CONFIDENCE.value:
      print_confidence(token_confidence, tokenizer)
    n = out.shape[1]
    rate = f", then {(n - 1) / (times[-1] - times[0]):.1f} tokens/s" if n > 1 else ""
    print(f"\n[{n} tokens; first after {times[0] - start:.2f} s (prefill, compile on "
          f"first use){rate}]", file=sys.stderr)
  sys.stdout.write("\n")
  return 0


def main(argv=None) -> int:
  return run_cli(sys.argv if argv is None else argv, run, flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
