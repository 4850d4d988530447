"""Shared plumbing: which implementation a kernel call runs, and whether Pallas interprets.

Every public kernel takes ``impl="auto" | "pallas" | "reference"`` (``None`` means the
process-wide default) and ``interpret: bool | None``:

* ``"reference"``: the pure-JAX path (always available, the CPU/TPU default).
* ``"pallas"``: the Pallas kernel; on a backend without a compiled Pallas GPU path it runs
  in interpret mode (slow, for tests), unless ``interpret=False`` is forced.
* ``"auto"``: Pallas where its backend exists (the target platform is CUDA), the
  reference elsewhere.

The process-wide default comes from ``set_default_impl(...)`` or, failing that, the
``VESPERJAX_KERNELS`` environment variable (``auto`` when unset).
"""
import os

from . import platform

IMPLS = ("auto", "pallas", "reference")
_ENV = "VESPERJAX_KERNELS"
_default_impl = None


def set_default_impl(impl):
  """Set the process-wide default (``None`` returns to the env var / ``auto``)."""
  global _default_impl
  if impl is not None and impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  _default_impl = impl


def get_default_impl():
  if _default_impl is not None:
    return _default_impl
  env = os.environ.get(_ENV, "auto").strip().lower() or "auto"
  if env not in IMPLS:
    raise ValueError(f"{_ENV} must be one of {IMPLS}, got {env!r}")
  return env


def pallas_gpu_available():
  """True when the target platform (``platform.current()``) is CUDA, where Pallas
  compiles GPU kernels; ROCm/TPU/CPU are left to the reference."""
  return platform.is_cuda()


def resolve(impl=None, interpret=None):
  """Returns ``(use_pallas, interpret)`` for one call."""
  impl = get_default_impl() if impl is None else impl
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl == "reference":
    return False, False
  gpu = pallas_gpu_available()
  if impl == "auto" and not gpu and not interpret:
    return False, False
  return True, (not gpu) if interpret is None else bool(interpret)


def triton_params(**kwargs):
  """Triton ``CompilerParams`` for a compiled call (``None`` in interpret mode)."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(**kwargs)
