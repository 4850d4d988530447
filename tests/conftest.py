"""Test-wide setup: eight simulated CPU devices (for sharding tests), quiet logs, and a
persistent compilation cache so identical steps compiled by several tests (and by CLI
subprocesses) are compiled once. Tests run on the CPU backend (JAX_PLATFORMS=cpu); the
GPU tests compile for GPU targets from it (tests/gpu_util.py).

The fixtures several folders share: `corpus` (real text to train on), `runs` (saved tiny
runs to export) and the `mounted_tmpfs` helper (a disk to fill up). A fixture of one
folder's tests lives in that folder's conftest.py (tests/studio/, tests/benchmarks/)."""
import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vesperjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def mounted_tmpfs(folder, size: str):
  """A tmpfs of `size` mounted on `folder` (a disk to fill up), unmounted afterwards;
  the test skips where mounting is not allowed."""
  import subprocess
  folder.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"cannot mount a tmpfs to fill up: {mount.stderr.strip()}")
  yield folder
  subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """~150 KB of real text: a few stdlib modules, blank-line separated documents."""
  import argparse, email, json as js  # noqa: E401
  text = "\n\n".join(open(m.__file__).read() for m in (email, js.decoder, argparse))
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(text)
  return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """runs(kind): a run directory of `save_run` (tests/test_export.py) for "dense",
  "flylora" or "moe", saved on first use (test_export.py, test_export_quantize.py)."""
  from tests.test_export import KINDS, save_run
  cache = {}

  def get(kind):
    if kind not in cache:
      cache[kind] = save_run(tmp_path_factory.mktemp(kind), **KINDS[kind])[0]
    return cache[kind]
  return get
