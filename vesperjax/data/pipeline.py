"""grain input pipeline over a token cache: windows, shuffle, shard, batch, prefetch.

Training windows: the flat token stream (documents joined by EOD) is cut into
W = (num_tokens - 1) // seq_len windows of seq_len + 1 tokens with stride seq_len
(neighbours share one token, so every token is a target exactly once per epoch).
Each epoch shifts all windows by a deterministic offset in [0, slack] (slack =
num_tokens - 1 - W * seq_len < seq_len) so boundaries move between epochs, and visits
them in a fresh seeded order (grain `shuffle` + `repeat(reseed_each_epoch=True)`).
Windows ignore document boundaries: the EOD token tells the model where one ends.

Sharding: every host shuffles the window ids identically; global batch b is windows
b*G .. (b+1)*G-1 of that order, and host p reads only its rows p*h .. (p+1)*h-1
(h = G / process_count). Hosts read disjoint windows, and the global batch (so the whole
run) is the same whatever the number of processes. Each host yields int32
`[global_batch // process_count, seq_len + 1]`; use `inputs, targets = x[:, :-1], x[:, 1:]`.

Mixtures (`mixture.Mixture`, several caches with weights) replace the one shuffled
stream by their mixed one; sharding, batching and state are the same.

The iterator is a `grain.DatasetIterator`: `get_state()`/`set_state()` (and
`grain.checkpoint.CheckpointSave/Restore` under Orbax) resume exactly. Its state counts
global batches, the same on every process, so a checkpoint continues under another
process count from the same global batch (`restore_global_position`).
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Iterator

import grain
import numpy as np

from vesperjax.data import errors
from vesperjax.data.cache import TokenCache
from vesperjax.data.windows import Windows, ordered_windows, window_stream  # noqa: F401

if TYPE_CHECKING:
  from vesperjax.data.mixture import Mixture


def _shard(process_index, process_count):
  import jax  # lazily: the CLI and tests that pass both never pay for it
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise errors.DataError(f"process_index {pi} not in [0, {pc})")
  return pi, pc


def _host_batch(global_batch: int, pc: int) -> int:
  if global_batch < 1 or global_batch % pc:
    raise errors.DataError(
        f"global batch {global_batch} is not a positive multiple of {pc} processes")
  return global_batch // pc


class _HostRow:
  """map fn: this host's m-th row -> its element of the global stream."""

  def __init__(self, stream, global_batch: int, host_batch: int, process_index: int):
    self.stream, self.gb, self.hb, self.pi = stream, global_batch, host_batch, process_index

  def __call__(self, m):
    m = int(m)
    return self.stream[(m // self.hb) * self.gb + self.pi * self.hb + m % self.hb]


def train_dataset(cache: TokenCache | Mixture, seq_len: int, global_batch: int, *,
                  seed: int = 0, process_index: int | None = None,
                  process_count: int | None = None, num_epochs: int | None = None,
                  num_workers: int = 0, read_threads: int = 2,
                  prefetch_buffer: int = 4) -> grain.IterDataset:
  """Infinite (or `num_epochs`) shuffled batches for this host; iterate with iter().

  `cache`: a `TokenCache`, or a `mixture.Mixture` of several (each source's windows
  shuffled on its own, then mixed by weight: docs/data.md).
  """
  pi, pc = _shard(process_index, process_count)
  hb = _host_batch(global_batch, pc)
  if isinstance(cache, TokenCache):
    windows = Windows(cache, seq_len, seed)
    if len(windows) < global_batch:
      raise errors.DatasetTooSmallError(
          f"{cache.path}: {len(windows)} windows of {seq_len + 1} tokens, fewer than the "
          f"global batch {global_batch}; use more data, a shorter seq_len or a smaller "
          f"batch")
    stream = window_stream(cache, seq_len, seed=seed, num_epochs=num_epochs)
  else:
    stream = cache.window_stream(seq_len, seed=seed, num_epochs=num_epochs)
  rows = len(stream) // global_batch * hb
  ds = grain.MapDataset.range(rows).map(_HostRow(stream, global_batch, hb, pi))
  ds = ds.batch(hb, drop_remainder=True, batch_fn=np.stack)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch_buffer))
  if num_workers > 0:
    _mark_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def train_iterator(cache: TokenCache | Mixture, seq_len: int, global_batch: int,
                   **kw) -> grain.DatasetIterator:
  """`iter(train_dataset(...))`: checkpointable with get_state()/set_state()."""
  return iter(train_dataset(cache, seq_len, global_batch, **kw))


def saved_by_other_process_count(folder: str, process_index: int | None = None,
                                 process_count: int | None = None) -> bool:
  """Whether a checkpoint's iterator `folder` (grain's `process_<i>-of-<n>.json` files)
  was written by another number of processes: grain then finds no file of this
  process's and refuses it (`restore_global_position` reads it instead)."""
  pi, pc = _shard(process_index, process_count)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  mine = f"process_{pi}-of-{pc}.json"
  return mine not in names and any(_STATE_FILE.fullmatch(n) for n in names)


_STATE_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


def restore_global_position(folder: str, iterator: grain.DatasetIterator) -> str | None:
  """Move `iterator` to the global batch saved in `folder` by a run with any number of
  processes; returns a note for the log when that number differs from this run's.

  Every process's state counts global batches (host row m of batch b is global row
  b * G + p * h + m % h), so the processes of one run save the same state and any of it
  continues the same global stream under another process count, each process now
  reading its own 1 / process_count share of every batch. States that differ (not
  written by this pipeline) raise a one-line DataError: nothing to continue from.
  """
  files = sorted(n for n in os.listdir(folder) if _STATE_FILE.fullmatch(n))
  if not files:
    raise errors.DataError(f"{folder}: no data iterator state (process_<i>-of-<n>.json)")
  states = {}
  for name in files:
    with open(os.path.join(folder, name)) as f:
      states[name] = f.read()
  if len({json.dumps(json.loads(t), sort_keys=True) for t in states.values()}) != 1:
    raise errors.DataError(
        f"{folder}: the processes saved different data positions ({', '.join(files)}), "
        "so none continues the global stream under another process count; resume with "
        "the process count that wrote it, or start a new --workdir")
  iterator.set_state(json.loads(states[files[0]]))
  if hasattr(iterator, "start_prefetch"):  # as grain's own checkpoint handler does
    iterator.start_prefetch()
  written = int(_STATE_FILE.fullmatch(files[0])[2])
  pc = _shard(None, None)[1]
  if written == pc:
    return None
  return (f"the data position was saved by {written} process(es), this run has {pc}: it "
          "continues from the same global batch, each process reading its own share")


def eval_batches(cache: TokenCache | Mixture, batch_size: int, seq_len: int,
                 num_batches: int | None = None, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[np.ndarray]:
  """Deterministic validation: windows in order, no shuffle, the same every call.

  `cache`: a `TokenCache`, or a `mixture.Mixture` (each source's windows in order,
  mixed by its weights). `batch_size` is global; each host gets rows
  [pi*hb, (pi+1)*hb) of every batch. `num_batches=None` covers as many full batches as
  the data holds (at least one).
  """
  pi, pc = _shard(process_index, process_count)
  hb = _host_batch(batch_size, pc)
  if isinstance(cache, TokenCache):
    stream = ordered_windows(cache, seq_len)
  else:
    stream = cache.eval_stream(seq_len)
  available = len(stream) // batch_size
  if available == 0:
    raise errors.DatasetTooSmallError(
        f"{cache.path}: {len(stream)} windows of {seq_len + 1} tokens, fewer than one "
        f"eval batch of {batch_size}")
  n = available if num_batches is None else min(num_batches, available)
  for b in range(n):
    first = b * batch_size + pi * hb
    yield np.stack([stream[first + r] for r in range(hb)])


def _mark_absl_flags_parsed():
  """grain's mp_prefetch reads absl flags; outside absl.app they are unparsed."""
  try:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  except ImportError:
    pass
