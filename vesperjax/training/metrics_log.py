"""WORKDIR/metrics.jsonl: one JSON object per line, `{"step": N, "<scalar>": value, ...}`.

The trainer appends to it (`actions.MetricsSink`); the studio, the tests and any other
reader go through `parse_records` / `read_records`, the one reader of the format. The
file stays strict, line-parseable JSON after any crash:

- a non-finite value is written as `null`, its key kept (bare `NaN` is not JSON, and
  browsers, jq and pandas refuse the line);
- a run about to append calls `prepare_for_append(path, step)` first: a torn last line
  (a crash mid-write) is cut off, so the next record starts on a line of its own, and
  rows logged after `step` (the checkpoint the run resumes from) are dropped, since the
  run logs those steps again; the file is rewritten atomically (a temporary file, then
  `os.replace`), so a crash during the repair leaves the old file whole;
- readers skip an incomplete last line (it may still be being written) and malformed
  lines, and read a non-finite number of an older file as None.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

FILE = "metrics.jsonl"


def _finite_or_none(value):
  return None if isinstance(value, float) and not math.isfinite(value) else value


def encode(step: int, scalars: dict) -> str:
  """One record's line (with its newline): non-finite values as null."""
  record = {"step": step, **{k: _finite_or_none(v) for k, v in scalars.items()}}
  return json.dumps(record, allow_nan=False) + "\n"


def parse_line(line: str | bytes) -> dict | None:
  """The record of one line, or None when it is not one (malformed, no integer step)."""
  try:  # older files hold bare NaN / Infinity, and 1e999 parses as inf: all read as None
    record = json.loads(line, parse_constant=lambda _: None,
                        parse_float=lambda s: _finite_or_none(float(s)))
  except (ValueError, RecursionError):
    return None
  if not isinstance(record, dict):
    return None
  step = record.get("step")
  return record if isinstance(step, int) and not isinstance(step, bool) else None


def parse_records(lines: Iterable[str | bytes]) -> list[dict]:
  """The records of complete lines, malformed ones skipped."""
  return [r for r in map(parse_line, lines) if r is not None]


def read_records(path: str) -> list[dict]:
  """Every record of the metrics file at `path` ([] when it does not exist)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return []
  return parse_records(data[:data.rfind(b"\n") + 1].splitlines())


def prepare_for_append(path: str, step: int) -> list[str]:
  """Make the metrics file at `path` ready for a run that continues after `step`: cut a
  torn last line, drop malformed lines and the rows logged after `step`. Returns one
  note per change (nothing when the file was already clean)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return []
  end = data.rfind(b"\n") + 1
  kept, later, malformed = [], 0, 0
  for line in data[:end].splitlines():
    record = parse_line(line)
    if record is None:
      malformed += bool(line.strip())
    elif record["step"] > step:
      later += 1
    else:
      kept.append(record)
  torn = len(data) - end
  if not (torn or later or malformed):
    return []
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(encode(r["step"], {k: v for k, v in r.items() if k != "step"})
                 for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  notes = []
  if torn:
    notes.append(f"{path}: cut a torn last line ({torn} bytes: the run stopped while "
                 "writing it)")
  if malformed:
    notes.append(f"{path}: dropped {malformed} malformed line(s)")
  if later:
    notes.append(f"{path}: dropped {later} row(s) logged after step {step}, where the "
                 "run resumes (it logs those steps again)")
  return notes
