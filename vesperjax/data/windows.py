"""A token cache cut into training windows of seq_len + 1 tokens (see `pipeline`'s
docstring for the layout): random access by window id, one shuffled stream per cache
(`window_stream`), or the windows in order for validation (`ordered_windows`). Both the
single-cache pipeline and mixtures (`mixture.Mixture`) build on these."""
from __future__ import annotations

import hashlib

import grain
import numpy as np

from vesperjax.data import errors
from vesperjax.data.cache import TokenCache


class Windows:
  """Random-access source of seq_len+1 token windows; memmap opened lazily per process."""

  def __init__(self, cache: TokenCache, seq_len: int, seed: int = 0):
    if seq_len < 1:
      raise errors.DataError(f"seq_len must be >= 1, got {seq_len}")
    n = cache.num_tokens
    if n < seq_len + 1:
      raise errors.DatasetTooSmallError(
          f"{cache.path}: {n} tokens, fewer than one window of seq_len + 1 = "
          f"{seq_len + 1}; use more data or a shorter seq_len")
    self.cache, self.seq_len, self.seed = cache, seq_len, seed
    self.num_windows = (n - 1) // seq_len
    self.slack = n - 1 - self.num_windows * seq_len

  def __len__(self):
    return self.num_windows

  def offset(self, epoch: int) -> int:
    if epoch == 0 or self.slack == 0:
      return 0
    h = hashlib.blake2b(f"{self.seed}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % (self.slack + 1)

  def window(self, i: int, epoch: int = 0) -> np.ndarray:
    start = self.offset(epoch) + i * self.seq_len
    return self.cache.read(start, start + self.seq_len + 1)  # ids checked against the vocab


class _Window:
  """map_with_index fn: (index in the repeated stream, window id) -> tokens."""

  def __init__(self, windows: Windows, per_epoch: int):
    self.windows, self.per_epoch = windows, per_epoch

  def __call__(self, index, i):
    return self.windows.window(int(i), int(index) // self.per_epoch)


def window_stream(cache: TokenCache, seq_len: int, *, seed: int = 0,
                  num_epochs: int | None = None) -> grain.MapDataset:
  """One cache's training windows: shuffled with `seed`, reshuffled and shifted every
  epoch, repeated `num_epochs` times (None: forever). Lazy: reads on access."""
  windows = Windows(cache, seq_len, seed)
  stream = grain.MapDataset.range(len(windows)).shuffle(seed=seed)
  stream = stream.repeat(num_epochs, reseed_each_epoch=True)
  return stream.map_with_index(_Window(windows, len(windows)))


def ordered_windows(cache: TokenCache, seq_len: int) -> grain.MapDataset:
  """One cache's non-overlapping windows in order (validation)."""
  windows = Windows(cache, seq_len)
  return grain.MapDataset.range(len(windows)).map(windows.window)
