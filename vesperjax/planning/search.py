"""The pure parts of `vesperjax.plan`: the max-batch search over a memory curve, and the
Chinchilla auto-scale (token budgets, token caches, the nearest preset). No jax here.
"""
from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Callable, Iterable

if TYPE_CHECKING:
  from vesperjax.run_config import RunConfig

DEFAULT_VOCAB = 32768  # no tokenizer in a plan: model.vocab_size, else this
TOKENS_PER_PARAM = 20  # Chinchilla: compute-optimal tokens per parameter
GiB = 2**30

Progress = Callable[[str], None] | None


def log_progress(progress: Progress, message: str) -> None:
  if progress is not None:
    progress(message)


def fmt_bytes(n) -> str:
  if n is None:
    return "n/a"
  return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 4 else f"{n / 2**20:.1f} MiB"


def _line(points: dict, budget: int, damp: tuple[str, int] | None = None):
  """(intercept, slope): through the two points that bracket the budget most closely,
  else (all on one side) through the outermost two, so that a local step in the curve
  does not set the slope of a long extrapolation.

  damp=(side, n): the last n compiles all landed on `side` ("over" or "fits") of the
  budget; the other bracket point's distance to the budget is halved n - 1 times (the
  Illinois rule), so a curved stretch is not approached from one side forever."""
  below = sorted(b for b, m in points.items() if m <= budget)
  above = sorted(b for b, m in points.items() if m > budget)
  if below and above:
    (b1, m1), (b2, m2) = (below[-1], points[below[-1]]), (above[0], points[above[0]])
    if damp and damp[1] > 1:
      if damp[0] == "over":
        m1 = budget - (budget - m1) / 2 ** (damp[1] - 1)
      else:
        m2 = budget + (m2 - budget) / 2 ** (damp[1] - 1)
  else:
    side = below or above
    (b1, m1), (b2, m2) = (side[0], points[side[0]]), (side[-1], points[side[-1]])
  slope = (m2 - m1) / (b2 - b1)
  return m1 - slope * b1, slope


def search_max_batch(measure: Callable[[int], int], budget: int, divisor: int, *,
                     seed: Iterable = (), start: int | None = None,
                     confirm_above: bool = True, limit: int | None = None,
                     progress: Progress = None) -> dict:
  """The largest multiple B of `divisor` with measure(B) <= budget (0 if none).

  `measure(B)` compiles and returns per-device bytes. Without hints it measures divisor
  and 8 x divisor, then repeatedly fits a line (through the two points that bracket the
  budget most closely, else the outermost two) and measures its prediction. When the line
  says the largest batch known to fit is the boundary, it measures one step above to
  confirm; it stops once B fits and B + divisor does not. A curve far from affine falls
  back to bisecting the bracket.

  Hints, for a program whose curve is roughly known: `seed`, (batch, bytes) pairs from a
  related compile (the same step on another card, or an intercept at batch 0) that place
  the predictions but never decide fits, and `start`, the first batch to measure.
  confirm_above=False skips the confirming compile of B + divisor when the line already
  puts it over the budget (`above_predicted` in the result).
  """
  d = divisor
  limit = limit or 2**20
  limit -= limit % d
  measured: dict[int, int] = {}
  known: dict[int, int] = {int(b): int(v) for b, v in seed}
  lo, hi, above_predicted = 0, None, False
  sides: list[str] = []

  def record(b: int) -> None:
    nonlocal lo, hi
    measured[b] = known[b] = value = int(measure(b))
    sides.append("fits" if value <= budget else "over")
    log_progress(progress,
                 f"  batch {b}: {fmt_bytes(value)} ({sides[-1]} {fmt_bytes(budget)})")
    if value <= budget:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)

  first = [start] if start else []
  if len(known) + len(first) < 2:
    first = [d] + first if first else [d, min(8 * d, limit)]
  for b in first:
    b = max(d, min(b - b % d, limit))
    if b not in measured and (hi is None or b < hi):
      record(b)
  for rounds in range(1, 41):
    if lo >= limit or (hi is not None and hi <= lo + d):
      break
    guess = lo + d
    if len(known) >= 2:
      streak = len(sides) - next((i + 1 for i in range(len(sides) - 1, -1, -1)
                               if sides[i] != sides[-1]), 0) if sides else 0
      a, slope = _line(known, budget, (sides[-1], streak) if sides else None)
      guess = limit if slope <= 0 else int((budget - a) // slope) // d * d
    if rounds > 6 and hi is not None:  # a curve far from affine: bisect the bracket
      guess = (lo + hi) // 2 // d * d
    if guess <= lo:  # the line puts the boundary at lo: confirm one step above
      if not confirm_above and lo in measured:
        above_predicted = True
        break
      guess = lo + d
    record(min(guess, (hi - d) if hi is not None else limit))
  return dict(max_batch=lo, per_device_bytes=measured.get(lo),
              next_bytes=measured.get(lo + d), above_predicted=above_predicted,
              capped=lo >= limit, compiles=len(measured), divisor=d, budget_bytes=budget,
              points=sorted([b, v] for b, v in measured.items()))


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_tokens(text: str) -> int:
  """A token count: 2e9, 2_000_000_000, 500M, 2B, 1.5T; or a token cache directory."""
  raw = str(text).strip()
  if os.path.exists(raw):
    return cache_tokens(raw)
  m = re.fullmatch(r"([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)",
                   raw)
  value = None
  if m:
    try:
      value = float(m[1].replace("_", "").replace(",", "")) * _SUFFIX[m[2].lower()]
    except ValueError:
      value = None
  if value is None or not math.isfinite(value) or value < 1:
    looks_like_path = os.sep in raw or raw.startswith(".")
    raise ValueError(f"--tokens {raw!r}: " + (
        "no such token cache" if looks_like_path else
        "not a token count (e.g. 2e9, 2_000_000_000, 500M, 2B) or a token cache directory"))
  return int(round(value))


def cache_tokens(path: str) -> int:
  """Token count of a built vesperjax token cache (its header; nothing is loaded)."""
  from vesperjax.data.cache import HEADER, TokenCache
  if os.path.basename(path) == HEADER:
    path = os.path.dirname(path) or "."
  return TokenCache.open(path).num_tokens


def chinchilla(run: RunConfig, tokens: int) -> dict:
  """Compute-optimal size for `tokens` (tokens / 20), the nearest preset, and its steps.

  Nearest = smallest |log(preset params / optimal)| (a factor of 2 either way is equally
  far), with each preset's `num_params` at the run's vocab (model.vocab_size, else
  32768). Steps = ceil(tokens / (batch_size x grad_accum x seq_len)).
  """
  from vesperjax.config import PRESET_NAMES, model_preset
  from vesperjax.model.size import num_params
  vocab = run.model.vocab_size or DEFAULT_VOCAB
  optimal = tokens / TOKENS_PER_PARAM
  sizes = {p: num_params(model_preset(p, vocab_size=vocab)) for p in PRESET_NAMES}
  preset = min(sizes, key=lambda p: abs(math.log(sizes[p] / optimal)))
  per_step = run.train.batch_size * run.train.grad_accum * run.data.seq_len
  return dict(tokens=tokens, tokens_per_param=TOKENS_PER_PARAM, params_optimal=optimal,
              vocab_size=vocab, preset=preset, preset_params=sizes[preset],
              preset_params_all=sizes, tokens_per_step=per_step,
              steps=-(-tokens // per_step))


