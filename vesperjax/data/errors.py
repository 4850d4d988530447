"""Typed data errors: one line, naming the file, so the CLI can print them as-is."""


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
