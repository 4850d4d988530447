"""Keep freed host memory in glibc's heap on the CPU backend, so steps stop page-faulting.

XLA:CPU allocates each step's temporaries afresh. Under glibc's defaults every large
buffer is a new mmap that the kernel zero-fills page by page and that free() unmaps
again, so a CPU train step spends much of its time in minor page faults
(docs/benchmarks.md, "The measurement behind each CPU choice"). One arena that never returns memory to the system (the MALLOC_ARENA_MAX,
MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_ settings, made with mallopt) brings that to 0.
The cost is that the process keeps its peak heap. `python -m vesperjax.<command>` applies
it as the package is first imported, before numpy's and XLA's threads have taken arenas
of their own (later it does not work), and only when XLA will run on the CPU:
JAX_PLATFORMS says cpu, or no accelerator plugin is installed.
`VESPERJAX_HOST_MALLOC=default` (or any MALLOC_* variable of the user's) leaves glibc
alone.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False


def keep_freed_memory() -> bool:
  """Apply the settings once (Linux glibc, CPU-only JAX); True if they are in effect."""
  global _applied
  if _applied:
    return True
  if (not sys.platform.startswith("linux")
      or os.environ.get("VESPERJAX_HOST_MALLOC", "") == "default"
      or any(k.startswith("MALLOC_") for k in os.environ)):
    return False
  if not _cpu_only():
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...)
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  _applied = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                  and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
  return _applied


_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu", "jax_plugins")


def _cpu_only() -> bool:
  """Whether JAX will run on the CPU, decided without initialising a backend."""
  platforms = os.environ.get("JAX_PLATFORMS", os.environ.get("JAX_PLATFORM_NAME", ""))
  if platforms:
    return platforms.strip().lower() == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)
