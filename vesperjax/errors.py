"""The error types that mean "bad input, not a bug", and the one-line formatter the
commands print them with (`error: <one line>`, exit status 2)."""
from __future__ import annotations


class RunError(RuntimeError):
  """A run that cannot start or continue as configured (one-line message)."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (missing, or not from this kind of run)."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written; the earlier ones are intact."""


def one_line(e: BaseException) -> str:
  """`e`'s message on one line (its type name if it has none)."""
  text = " ".join((str(e).strip() or type(e).__name__).split())
  return text.split(" See full TensorStore details")[0]  # a multi-kilobyte spec dump


def user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that describe bad input rather than a bug."""
  from absl import flags
  from vesperjax.training.workdir_lock import WorkdirBusy
  return (ValueError, OSError, RunError, CheckpointError, WorkdirBusy, flags.Error)
