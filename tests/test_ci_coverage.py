"""In CI the tests that need an optional toolchain must run, not skip. Each skips, saying
why, where its toolchain is missing (tests/gpu_util.py: the CUDA plugin wheels;
tests/tpu_util.py: libtpu; tests/test_export_hf.py: torch and transformers;
tests/test_lm_eval.py: lm-eval with its hf extra; the SLURM fixture of
tests/test_slurm.py fails by itself); a skip is easy to miss in a passing run.
With CI=true (set by .ci/run, and by most CI services) these tests fail instead."""
import importlib.metadata
import importlib.util
import os

import pytest

from tests import gpu_util, tpu_util

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
in_ci_only = pytest.mark.skipif(not IN_CI, reason="not a CI run (CI=true)")


@in_ci_only
def test_gpu_compile_tests_are_not_skipped_in_ci():
  assert gpu_util.GPU_COMPILE_PROBLEM is None, (
      f"CI=true but the GPU compile tests would skip: {gpu_util.GPU_COMPILE_PROBLEM}")
  condition = gpu_util.needs_gpu_compile.mark.args[0]  # the skipif those tests carry
  assert condition is False
  devices = gpu_util.target_devices("h100-80gb")  # the plugin loads and gives a target
  assert len(devices) == 1


@in_ci_only
def test_tpu_compile_tests_are_not_skipped_in_ci():
  assert tpu_util.TPU_COMPILE_PROBLEM is None, (
      f"CI=true but the TPU compile tests would skip: {tpu_util.TPU_COMPILE_PROBLEM}")
  condition = tpu_util.needs_tpu_compile.mark.args[0]  # the skipif those tests carry
  assert condition is False
  devices = tpu_util.devices("v5e:2x2")  # libtpu loads and gives a topology
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}


@in_ci_only
def test_hf_export_tests_are_not_skipped_in_ci():
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  assert not missing, f"CI=true but the hf export tests would skip: no {missing}"


@in_ci_only
def test_lm_eval_tests_are_not_skipped_in_ci():
  from vesperjax.eval import missing_packages
  assert not missing_packages(), (
      f"CI=true but the lm-eval tests would skip: no {missing_packages()}")


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
