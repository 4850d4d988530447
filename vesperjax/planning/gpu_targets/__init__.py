"""GPU target descriptions for deviceless compiles: XLA:GPU on a host without a GPU.

XLA compiles for a GPU it has never seen from a description of it (a
``stream_executor.GpuTargetConfigProto`` in text format, shipped here as ``<name>.txtpb``):
``jax.experimental.topologies.get_topology_desc`` turns one into compile-only devices, and
a jitted function traced on arguments placed on those devices compiles with every XLA:GPU
pass, Triton kernels down to cubin included, and reports per-device memory. What it
needs: the ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` wheels of the installed jax's
version (``pip install 'vesperjax[gpu-compile]'``, which pins them through jax's
``cuda12-local`` extra), no NVIDIA libraries and no GPU. cuDNN and Mosaic GPU custom calls are compiled on the
device at run time, so for them a deviceless compile checks the lowering only.

Importing this module sets ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` (unless set): without it
the CUDA plugin refuses to register on a host without CUDA, and the topology is missing.
Import it before anything initialises jax's backends.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.resources
import os
import re

from vesperjax.planning.compile_only import no_compilation_cache

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

TARGETS = ("h100-80gb", "h200", "a100-80gb")
_PLUGINS = ("jax-cuda12-plugin", "jax-cuda12-pjrt")


class TargetUnavailable(RuntimeError):
  """A deviceless compile cannot run here (plugin missing or of another version)."""


def _check_name(name: str) -> str:
  if name not in TARGETS:
    raise ValueError(f"unknown GPU target {name!r}; choose from {', '.join(TARGETS)}")
  return name


def target_config(name: str) -> str:
  """The target description (protobuf text) of `name`."""
  return importlib.resources.files(__name__).joinpath(
      f"{_check_name(name)}.txtpb").read_text()


def _field(name: str, key: str) -> str:
  m = re.search(rf"\b{key}:\s*\"?([^\s\"]+)", target_config(name))
  if m is None:
    raise ValueError(f"target {name}: no {key} in its description")
  return m[1]


def device_memory_bytes(name: str) -> int:
  """Memory of one device of the target, in bytes."""
  return int(_field(name, "device_memory_size"))


def device_kind(name: str) -> str:
  """The device kind the target's compile-only devices report (e.g. "NVIDIA H200")."""
  m = re.search(r'device_description_str:\s*"([^"]*)"', target_config(name))
  return m[1] if m else name


def cudnn_version(name: str) -> int:
  """The cuDNN version of the target description, as cudnnGetVersion() encodes it."""
  block = re.search(r"dnn_version_info\s*{([^}]*)}", target_config(name))
  nums = dict(re.findall(r"(major|minor|patch):\s*(\d+)", block[1] if block else ""))
  return int(nums.get("major", 9)) * 10000 + int(nums.get("minor", 0)) * 100 + int(
      nums.get("patch", 0))


def plugin_problem() -> str | None:
  """Why deviceless GPU compiles cannot run here (None when they can)."""
  import jax  # pylint: disable=g-import-not-at-top
  for pkg in _PLUGINS:
    try:
      version = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return (f"{pkg} is not installed: pip install {' '.join(f'{p}=={jax.__version__}' for p in _PLUGINS)}")
    if version != jax.__version__:
      return (f"{pkg} {version} does not match jax {jax.__version__}: pip install "
              f"{' '.join(f'{p}=={jax.__version__}' for p in _PLUGINS)}")
  return None


@functools.lru_cache(maxsize=None)
def devices(name: str, count: int = 1) -> tuple:
  """`count` compile-only devices of target `name` (one host)."""
  _check_name(name)
  if not isinstance(count, int) or count < 1:
    raise ValueError(f"device count must be a positive integer, got {count!r}")
  problem = plugin_problem()
  if problem:
    raise TargetUnavailable(f"deviceless GPU compile unavailable: {problem}")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=target_config(name))
  except NotImplementedError as e:
    raise TargetUnavailable(
        "deviceless GPU compile unavailable: the CUDA plugin did not register (set "
        "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts, or import "
        f"vesperjax.planning.gpu_targets first): {e}") from None
  return tuple(topo.devices)


@contextlib.contextmanager
def target_cudnn(name: str):
  """Let cuDNN attention trace for `name` on a host without cuDNN.

  jax asks the local cuDNN library for its version while tracing cuDNN attention (and
  fails on a host without one); its graph is built on the device at run time, so the
  version only gates features. Inside this block a host without cuDNN reports the
  target description's version instead; a host with cuDNN keeps its own.
  """
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
  probe = fa.check_cudnn_version
  try:
    probe()
    has_cudnn = True
  except RuntimeError:
    has_cudnn = False
  if not has_cudnn:
    fa.check_cudnn_version = lambda: cudnn_version(name)
  try:
    yield
  finally:
    fa.check_cudnn_version = probe


@contextlib.contextmanager
def deviceless(name: str):
  """Trace, lower and compile for target `name` inside this block: cuDNN attention
  traces (`target_cudnn`), and the executables stay out of jax's persistent compilation
  cache (`compile_only.no_compilation_cache`)."""
  with target_cudnn(name), no_compilation_cache():
    yield
