"""Helpers for the GPU lowering and deviceless-compile tests (no GPU needed).

`lowered_for_cuda` lowers a function for CUDA on this host's CPU devices (any machine);
`target_devices` gives compile-only devices of a GPU target, and `needs_gpu_compile`
skips, saying why, where the CUDA plugin wheels are not installed.
"""
import collections
import re

import pytest

from vesperjax.planning import gpu_targets

GPU_COMPILE_PROBLEM = gpu_targets.plugin_problem()
needs_gpu_compile = pytest.mark.skipif(GPU_COMPILE_PROBLEM is not None,
                                       reason=str(GPU_COMPILE_PROBLEM))

_STABLEHLO_CALL = re.compile(r"custom_call @([\w$.]+)")
_HLO_CALL = re.compile(r'custom_call_target="([^"]+)"')


def lowered_for_cuda(fn, *args, **kwargs):
  """StableHLO text of `fn` (a jitted function) lowered for CUDA from this host.

  The caller chooses the target platform (e.g. `kernels.platform.use("cuda")` or a
  step built with train.platform="cuda"); this only lowers for CUDA and lets cuDNN
  attention trace without a local cuDNN.
  """
  with gpu_targets.target_cudnn("h100-80gb"):
    return fn.trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()


def custom_calls(text: str) -> collections.Counter:
  """Custom-call targets in StableHLO or compiled HLO text."""
  return collections.Counter(_STABLEHLO_CALL.findall(text) + _HLO_CALL.findall(text))


def target_devices(name: str = "h100-80gb", count: int = 1):
  return list(gpu_targets.devices(name, count))


def compile_for(target: str, fn, *args):
  """Compile a jitted fn whose arguments sit on `target`'s compile-only devices."""
  with gpu_targets.deviceless(target):
    return fn.trace(*args).lower().compile()
