"""Fixtures and helpers of the studio's tests: run directories written by hand
(`write_run`, the `tree` fixture) and an in-process client of the app (`client`;
starlette is imported on first use, so a module without it still skips as it says)."""
import json
import os
import socket

import pytest

from vesperjax.studio import runs


def write_run(root, name, *, steps=(10, 20), max_steps=20, lock_pid=None, job=None,
              console=""):
  d = root / name
  d.mkdir()
  (d / "config.json").write_text(json.dumps({
      "model": {"preset": "tiny"}, "optim": {"name": "velvet"},
      "train": {"max_steps": max_steps}}))
  with open(d / "metrics.jsonl", "w") as f:
    for s in steps:
      f.write(json.dumps({"step": s, "loss": 5.0 - s / 100, "tokens_per_s": 1000.0}) + "\n")
    f.write(json.dumps({"step": steps[-1], "eval_loss": 4.5}) + "\n")
    f.write('{"step": 99, "loss": 1.0')  # a line still being written: not read
  (d / "checkpoints" / str(steps[-1])).mkdir(parents=True)
  if lock_pid is not None:
    (d / ".lock").write_text(json.dumps({"pid": lock_pid, "host": socket.gethostname()}))
  if job is not None:
    (d / runs.JOB).write_text(json.dumps(job))
  (d / runs.CONSOLE).write_text(console)
  return d


@pytest.fixture
def tree(tmp_path):
  root = tmp_path / "runs"
  root.mkdir()
  write_run(root, "done")
  write_run(root, "halted", max_steps=100)
  write_run(root, "live", max_steps=100, lock_pid=os.getpid())
  write_run(root, "broken", max_steps=100, job={"kind": "train", "exit_code": 2},
            console="loading\nerror: data.dataset /x: no such file\n")
  data = tmp_path / "data"
  (data / "sub").mkdir(parents=True)
  (data / "sub" / "a.txt").write_text("hello world\n" * 50)
  (data / "notes.md").write_text("not a dataset")
  return root, data


def client(root, data_roots=(), token=None, **kw):
  from starlette.testclient import TestClient
  from vesperjax.studio.app import create_app
  return TestClient(create_app(str(root), [str(d) for d in data_roots], token=token),
                    base_url="http://127.0.0.1:8765", **kw)
