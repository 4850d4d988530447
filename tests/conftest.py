"""Test-wide setup: eight simulated CPU devices (for sharding tests), quiet logs, and a
persistent compilation cache so identical steps compiled by several tests (and by CLI
subprocesses) are compiled once. Tests run on the CPU backend (JAX_PLATFORMS=cpu); the
GPU tests compile for GPU targets from it (tests/gpu_util.py). Fixtures of one folder's
tests are in that folder's conftest.py (tests/benchmarks/: `fake_original`)."""
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
