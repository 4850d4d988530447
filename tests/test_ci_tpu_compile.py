"""In CI the TPU compile tests must run, not skip. They skip, saying why, where libtpu is
missing or gives no topology (tests/tpu_util.py); a skip is easy to miss in a passing
run. With CI=true (set by .ci/run, and by most CI services) this test fails instead,
whatever kept libtpu from compiling."""
import importlib.metadata
import os

import pytest

from tests import tpu_util

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def test_libtpu_pin_follows_jax():
  """The tpu-compile extra installs jax[tpu], whose libtpu pin is the installed jax's;
  .ci/run reads the same pin. Where libtpu is installed it must match it."""
  pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax")
          if r.startswith("libtpu") and 'extra == "tpu"' in r]
  assert len(pins) == 1, pins
  try:
    version = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("libtpu is not installed")
  prefix = pins[0].removeprefix("libtpu==").rstrip("*").rstrip(".")
  assert version.startswith(prefix), (version, pins[0])


@pytest.mark.skipif(not IN_CI, reason="not a CI run (CI=true)")
def test_tpu_compile_tests_are_not_skipped_in_ci():
  assert tpu_util.TPU_COMPILE_PROBLEM is None, (
      f"CI=true but the TPU compile tests would skip: {tpu_util.TPU_COMPILE_PROBLEM}")
  condition = tpu_util.needs_tpu_compile.mark.args[0]  # the skipif those tests carry
  assert condition is False
  devices = tpu_util.devices("v5e:2x2")  # libtpu loads and gives a topology
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
