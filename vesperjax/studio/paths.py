"""Names from the browser, confined: run names to one folder under --runs, dataset paths
to files under a data root (no `..`, no absolute paths, no symlink leading out, and for
a folder, none below it either)."""
from __future__ import annotations

import os
import re

from vesperjax.studio import safe_files

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ROOT_INDEX = re.compile(r"[0-9]{1,4}")  # ASCII only: str.isdigit also takes '²'
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")
MAX_DATASET_CHARS = 4096


class BadRequest(ValueError):
  """Input the page can correct: answered with HTTP 400 (or `status`) and the message."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def shown(value, limit: int = 80) -> str:
  """`repr(value)`, cut to `limit` characters: an error message echoes input, not all of
  it."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 1] + "…"


def run_dir(runs_root: str, name: str, *, must_exist: bool = True) -> str:
  """The real path of run `name` directly under `runs_root`."""
  if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
    raise BadRequest(f"run name {shown(name)}: use 1-64 letters, digits, '.', '_' or "
                     "'-', starting with a letter or digit")
  root = os.path.realpath(runs_root)
  path = os.path.realpath(os.path.join(root, name))
  if os.path.dirname(path) != root:  # a symlink pointing elsewhere
    raise BadRequest(f"run {name!r} is not inside {runs_root}")
  if must_exist and not os.path.isdir(path):
    raise BadRequest(f"no run named {name!r}", status=404)
  return path


def data_file(roots: list[str], rel: str) -> str:
  """The real path of dataset `rel` ("ROOT_INDEX:relative/path" or a path relative to
  the only root), which must be a file or folder under that root; a folder's files and
  folders must not lead out of the data roots either (the trainer reads each)."""
  if not roots:
    raise BadRequest("no data root: start the studio with --data-root DIR")
  if not isinstance(rel, str) or not rel.strip():
    raise BadRequest("choose a dataset")
  if len(rel) > MAX_DATASET_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in rel):
    raise BadRequest(f"dataset {shown(rel)}: not a file name (too long, or a control "
                     "character)")
  index, _, tail = rel.partition(":")
  if tail and ROOT_INDEX.fullmatch(index):
    if int(index) >= len(roots):
      raise BadRequest(f"dataset {rel!r}: no data root {index}")
    root, rel = roots[int(index)], tail
  else:
    root = roots[0]
  if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
    raise BadRequest(f"dataset {rel!r}: give a path inside the data root, without '..'")
  path = safe_files.resolve(root, rel)
  if path is None:
    raise BadRequest(f"dataset {rel!r} leads outside the data root")
  if not os.path.exists(path):
    raise BadRequest(f"dataset {rel!r}: no such file or folder", status=404)
  if os.path.isdir(path):
    real_roots = [os.path.realpath(r) for r in roots]
    try:
      out = safe_files.links_leading_out(path, real_roots, skip_hidden=True)
    except safe_files.TooManyFiles as e:
      raise BadRequest(f"dataset {rel!r}: {e}") from None
    if out is not None:
      raise BadRequest(f"dataset {rel!r}: {out} in it leads outside the data roots")
  return path


def dataset_name(roots: list[str], path) -> str:
  """The `data_file` name of real path `path` (a dataset a job recorded), if it lies
  under a data root: so a resumed job goes through the same checks as a new one."""
  if not isinstance(path, str) or not os.path.isabs(path):
    raise BadRequest(f"dataset {shown(path)}: not a path under a data root", status=409)
  for i, root in enumerate(roots):
    real_root = os.path.realpath(root)
    if safe_files.inside(path, real_root) and path != real_root:
      return f"{i}:{os.path.relpath(path, real_root)}"
  raise BadRequest(f"dataset {shown(path)} is not under a data root (--data-root)",
                   status=409)


def list_datasets(roots: list[str], limit: int = 500) -> list[dict]:
  """Dataset files and folders under each root, as `data_file` names them."""
  out = []
  for i, root in enumerate(roots):
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(real_root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for f in sorted(filenames):
        full = os.path.join(dirpath, f)
        real = os.path.realpath(full)
        if not f.endswith(DATA_SUFFIXES) or not safe_files.inside(real, real_root):
          continue
        try:
          size = os.path.getsize(real)
        except OSError:  # a dangling link
          continue
        rel = os.path.relpath(full, real_root)
        out.append(dict(name=f"{i}:{rel}" if len(roots) > 1 else rel, root=root,
                        bytes=size))
        if len(out) >= limit:
          return out
  return out
