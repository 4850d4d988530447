"""Typed data errors: one line, naming the file, so the CLI can print them as-is."""
import errno
import os
import shutil


class DataError(ValueError):
  """Base class for every bad-input error raised by vesperjax.data."""


class MissingPathError(DataError):
  """A dataset, tokenizer or cache path does not exist."""


class EmptySourceError(DataError):
  """A file (or a whole dataset, or a split) holds no text."""


class DecodeError(DataError):
  """A text file is binary or not valid UTF-8."""


class MalformedRecordError(DataError):
  """A JSONL line or SQuAD file does not have the expected structure."""


class DatasetTooSmallError(DataError):
  """Fewer tokens than one training window (seq_len + 1)."""


class TokenizerError(DataError):
  """Unknown tokenizer spec, or a tokenizer file that does not parse."""


class CacheError(DataError):
  """A token cache is missing, corrupt, or does not match its inputs."""


class DamagedCacheError(CacheError):
  """A token cache whose bytes no longer match what was recorded when it was built.

  `damage` says what is wrong (file, byte range or token, what was expected); the
  message adds how to recover, for callers that show it as is. `build_or_load` prints
  `damage` alone, since it rebuilds the cache itself."""

  def __init__(self, damage: str, cache_dir: str):
    super().__init__(f"{damage}; delete {cache_dir} or run `python -m vesperjax.data "
                     "build` (or any run) on its dataset to rebuild it")
    self.damage, self.cache_dir = damage, cache_dir

  def __reduce__(self):  # grain's worker processes send it back pickled
    return type(self), (self.damage, self.cache_dir)


class DiskFullError(DataError):
  """No space was left on a device while data or a tokenizer was being written."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(e: BaseException, path: str, stage: str) -> DiskFullError | None:
  """`e` as one line naming `path`, `stage` (what was being written) and the space free
  there now, if it is a full disk or quota (else None). Call it once the partial files
  are removed, so the space reported is what the user really has."""
  if not (isinstance(e, OSError) and e.errno in NO_SPACE):
    return None
  where = os.path.dirname(os.path.abspath(path))
  while where and not os.path.isdir(where):  # the partial folder itself is gone
    where = os.path.dirname(where)
  try:
    free = _size(shutil.disk_usage(where).free)
  except OSError:
    free = "unknown"
  what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
  return DiskFullError(f"{what} while {stage} ({path}; {free} free in {where}); its "
                       "partial files were removed; free some space or write to another "
                       "disk")


def _size(n: float) -> str:
  if n < 1000:
    return f"{int(n)} B"
  for unit in ("KB", "MB", "GB"):
    n /= 1000
    if n < 1000:
      break
  return f"{n:.1f} {unit}"
