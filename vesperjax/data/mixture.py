"""Weighted data mixtures: several token caches mixed by grain with fixed weights.

Spec (`config.data.mixture`): `NAME=PATH:WEIGHT` entries separated by commas, e.g.
`web=/data/fineweb/*.parquet:0.7,code=/data/code:0.3`. PATH is any dataset spec
`open_source` accepts (a file, folder, glob, comma list, `stdlib`) without a split
suffix; WEIGHT is a positive number (weights need not sum to 1). A comma starts a new
entry only when `NAME=` follows it, so a PATH may itself be a comma list.

Mixing: each source's windows form their own shuffled, repeated stream (`windows.
window_stream`, seeded by the run's seed and the source's name); `MixtureIndex` says
which source the k-th element of the mixture comes from, and grain's
`MapDataset.select_from_datasets` reads it. The index is grain's own proportional
interleave (the one behind `MapDataset.mix`) over exact rational weights: among the
first n elements source i holds `counts(n)[i]`, within K (the number of sources) of
`n * w_i / sum(w)`. Everything stays a deterministic MapDataset, so the host sharding,
batching and checkpointable iterator of `pipeline` apply unchanged: resume is exact and
hosts read disjoint rows. Every window holds `seq_len` targets, so a source's share of
the tokens seen is its share of the windows, `counts(rows) / rows`, logged as
`data/share/NAME`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
import re
import sys
from fractions import Fraction
from typing import Iterator, Sequence

import grain

from vesperjax.data import errors
from vesperjax.data.cache import TokenCache
from vesperjax.data.sources import SPLITS
from vesperjax.data.windows import ordered_windows, window_stream

_NAME = re.compile(r"[A-Za-z0-9_-]+")
# a comma followed by `NAME=` starts the next entry (a bare comma belongs to a PATH list)
_ENTRY_START = re.compile(r",(?=\s*[A-Za-z0-9_-]+\s*=)")
# weights relative to the largest are exact fractions of at most this denominator
_WEIGHT_DENOMINATOR = 10**6


@dataclasses.dataclass(frozen=True)
class MixtureSource:
  """One entry of a mixture spec."""
  name: str  # [A-Za-z0-9_-]+, unique: the BPE's file name, the `data/share/NAME` scalar
  dataset: str  # a dataset spec for `open_source`
  weight: float  # > 0; relative to the other entries' weights


def parse_mixture(spec: str) -> tuple[MixtureSource, ...]:
  """The entries of `NAME=PATH:WEIGHT,...`; a one-line `DataError` for a malformed
  entry, a weight that is not a positive finite number, or a repeated name."""
  entries = [e.strip() for e in _ENTRY_START.split(str(spec).strip())]
  if len(entries) < 2:
    raise errors.DataError(
        f"{spec!r}: a mixture needs at least two NAME=PATH:WEIGHT entries separated by "
        "commas (one dataset: use data.dataset)")
  out, seen = [], set()
  for entry in entries:
    name, eq, rest = entry.partition("=")
    name = name.strip()
    if not eq or not _NAME.fullmatch(name):
      raise errors.DataError(f"{entry!r}: expected NAME=PATH:WEIGHT with NAME made of "
                             "letters, digits, '_' or '-'")
    path, colon, weight_text = rest.rpartition(":")
    path = path.strip()
    try:
      weight = float(weight_text) if colon else math.nan
    except ValueError:
      weight = math.nan
    if not colon or not path:
      raise errors.DataError(f"{entry!r}: expected NAME=PATH:WEIGHT (the weight is the "
                             "number after the last ':')")
    if not (math.isfinite(weight) and weight > 0):
      raise errors.DataError(f"{name}: weight {weight_text.strip()!r} is not a positive "
                             "number")
    if name in seen:
      raise errors.DataError(f"{name}: the name appears twice in the mixture")
    base, _, tail = path.rpartition(":")
    if base and tail in SPLITS:
      raise errors.DataError(f"{name}: {path!r} names a split; the run chooses each "
                             "source's split (drop ':" + tail + "')")
    seen.add(name)
    out.append(MixtureSource(name, path, weight))
  largest = max(m.weight for m in out)
  for m in out:
    if m.weight * _WEIGHT_DENOMINATOR < largest:
      raise errors.DataError(f"{m.name}: weight {m.weight:g} is below 1e-6 of the "
                             f"largest weight ({largest:g})")
  return tuple(out)


class MixtureIndex(grain.transforms.DatasetSelectionMap):
  """Mixture position k -> (source, index in that source's stream), deterministic.

  The weights are made exact integers `proportions` (each weight over the largest as a
  fraction of denominator at most 1e6, scaled by their common denominator; P their
  sum). Among the first n positions source 0 holds ceil(n * p0 / P); the rest go to
  the others, recursively (grain's interleave). So `counts(n)` is exact, sums to n,
  and each entry is within K (the number of sources) of `n * p_i / P`.
  `lengths`: each source stream's length (None: infinite streams).
  """

  def __init__(self, weights: Sequence[float], lengths: Sequence[int] | None = None):
    if not weights or min(weights) <= 0:
      raise errors.DataError(f"mixture weights must be positive, got {list(weights)}")
    fractions = [Fraction(w / max(weights)).limit_denominator(_WEIGHT_DENOMINATOR)
                 for w in weights]
    if min(fractions) == 0:
      raise errors.DataError(f"mixture weights {list(weights)}: each must be at least "
                             "1e-6 of the largest")
    scale = math.lcm(*(f.denominator for f in fractions))
    self.proportions = tuple(int(f * scale) for f in fractions)
    self._length = sys.maxsize if lengths is None else self._fit(lengths)

  def counts(self, n: int) -> list[int]:
    """How many of the first `n` positions each source holds."""
    out, remaining = [], sum(self.proportions)
    for p in self.proportions:
      rest = n * (remaining - p) // remaining
      out.append(n - rest)
      n, remaining = rest, remaining - p
    return out

  def shares(self, n: int) -> list[float]:
    """Each source's fraction of the first `n` positions (n > 0)."""
    return [c / n for c in self.counts(n)]

  def _fit(self, lengths: Sequence[int]) -> int:
    """The most positions no source runs out of (counts are monotone in n)."""
    lo, hi = 0, sum(lengths)
    while lo < hi:
      mid = (lo + hi + 1) // 2
      if all(c <= n for c, n in zip(self.counts(mid), lengths)):
        lo = mid
      else:
        hi = mid - 1
    return lo

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, k: int) -> tuple[int, int]:
    before, after = self.counts(k), self.counts(k + 1)
    for i, (b, a) in enumerate(zip(before, after)):
      if a != b:
        return i, b
    raise AssertionError("unreachable: one source gains position k")


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Token caches with weights: `train_dataset`, `train_iterator` and `eval_batches`
  take one in place of a single `TokenCache`."""
  names: tuple[str, ...]
  caches: tuple[TokenCache, ...]
  weights: tuple[float, ...]

  def __post_init__(self):
    if not len(self.names) == len(self.caches) == len(self.weights) or not self.names:
      raise errors.DataError("a mixture needs one name, cache and weight per source")

  @property
  def path(self) -> str:
    """For messages: every source's cache."""
    return "mixture(" + ", ".join(f"{n}={c.path}" for n, c in
                                  zip(self.names, self.caches)) + ")"

  @property
  def index(self) -> MixtureIndex:
    return MixtureIndex(self.weights)

  def share_scalars(self, rows: int) -> dict[str, float]:
    """`data/share/NAME`: each source's share of the first `rows` windows of the
    global training stream (of its tokens too: all windows are equally long)."""
    if rows <= 0:
      return {}
    return {f"data/share/{n}": s for n, s in zip(self.names, self.index.shares(rows))}

  def window_stream(self, seq_len: int, *, seed: int = 0,
                    num_epochs: int | None = None) -> grain.MapDataset:
    """The mixed training windows, each source shuffled and repeated on its own."""
    streams = [window_stream(c, seq_len, seed=source_seed(seed, n),
                                      num_epochs=num_epochs)
               for n, c in zip(self.names, self.caches)]
    lengths = None if num_epochs is None else [len(s) for s in streams]
    return grain.MapDataset.select_from_datasets(streams,
                                                 MixtureIndex(self.weights, lengths))

  def eval_stream(self, seq_len: int) -> grain.MapDataset:
    """Validation windows: each source's in order, mixed by the same index, until the
    first source runs out."""
    streams = [ordered_windows(c, seq_len) for c in self.caches]
    return grain.MapDataset.select_from_datasets(
        streams, MixtureIndex(self.weights, [len(s) for s in streams]))


def source_seed(seed: int, name: str) -> int:
  """A source's shuffle seed: the run's seed and its name (not its position)."""
  digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=4).digest()
  return int.from_bytes(digest, "little") & 0x7FFFFFFF


def sample_texts(pieces: Sequence[Iterator[str]], weights: Sequence[float],
                 max_bytes: int) -> Iterator[str]:
  """Texts drawn from every source in proportion to its weight, at most
  `max_bytes * w_i / sum(w)` characters of source i: a tokenizer's training sample.
  Sources are interleaved (the one furthest below its budget goes next), so a sample
  cut short still covers them all; a source that runs out leaves its budget unused."""
  total = sum(weights)
  budgets = [max_bytes * w / total for w in weights]
  heap = [(0.0, i) for i in range(len(pieces))]
  taken = [0] * len(pieces)
  iters = [iter(p) for p in pieces]
  while heap:
    _, i = heapq.heappop(heap)
    text = next(iters[i], None)
    if text is None:
      continue
    yield text
    taken[i] += len(text)
    if taken[i] < budgets[i]:
      heapq.heappush(heap, (taken[i] / budgets[i], i))
