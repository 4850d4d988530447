"""Names from the browser, confined: run names to one folder under --runs, dataset paths
to files under a data root (no `..`, no absolute paths, no symlink leading out)."""
from __future__ import annotations

import os
import re

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".arrow")


class BadRequest(ValueError):
  """Input the page can correct: answered with HTTP 400 (or `status`) and the message."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _inside(path: str, root: str) -> bool:
  return os.path.commonpath([path, root]) == root


def run_dir(runs_root: str, name: str, *, must_exist: bool = True) -> str:
  """The real path of run `name` directly under `runs_root`."""
  if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or name in (".", ".."):
    raise BadRequest(f"run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                     "starting with a letter or digit")
  root = os.path.realpath(runs_root)
  path = os.path.realpath(os.path.join(root, name))
  if os.path.dirname(path) != root:  # a symlink pointing elsewhere
    raise BadRequest(f"run {name!r} is not inside {runs_root}")
  if must_exist and not os.path.isdir(path):
    raise BadRequest(f"no run named {name!r}", status=404)
  return path


def data_file(roots: list[str], rel: str) -> str:
  """The real path of dataset `rel` ("ROOT_INDEX:relative/path" or a path relative to
  the only root), which must be a file or folder under that root."""
  if not roots:
    raise BadRequest("no data root: start the studio with --data-root DIR")
  if not isinstance(rel, str) or not rel.strip():
    raise BadRequest("choose a dataset")
  index, _, tail = rel.partition(":")
  if tail and index.isdigit():
    if int(index) >= len(roots):
      raise BadRequest(f"dataset {rel!r}: no data root {index}")
    root, rel = roots[int(index)], tail
  else:
    root = roots[0]
  if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
    raise BadRequest(f"dataset {rel!r}: give a path inside the data root, without '..'")
  real_root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(real_root, rel))
  if not _inside(path, real_root):
    raise BadRequest(f"dataset {rel!r} leads outside the data root")
  if not os.path.exists(path):
    raise BadRequest(f"dataset {rel!r}: no such file or folder", status=404)
  return path


def list_datasets(roots: list[str], limit: int = 500) -> list[dict]:
  """Dataset files and folders under each root, as `data_file` names them."""
  out = []
  for i, root in enumerate(roots):
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(real_root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for f in sorted(filenames):
        full = os.path.join(dirpath, f)
        if f.endswith(DATA_SUFFIXES) and _inside(os.path.realpath(full), real_root):
          rel = os.path.relpath(full, real_root)
          out.append(dict(name=f"{i}:{rel}" if len(roots) > 1 else rel,
                          root=root, bytes=os.path.getsize(full)))
          if len(out) >= limit:
            return out
  return out
