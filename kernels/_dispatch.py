"""Shared plumbing: which implementation a kernel call runs, and whether Pallas interprets.

The per-platform choices themselves are rows of ``platform.CHOICES``; this module holds
the process-wide switch that overrides them and the Pallas-Triton limits.

Every public kernel takes ``impl="auto" | "pallas" | "reference"`` (``None`` means the
process-wide default) and ``interpret: bool | None``:

* ``"reference"``: the pure-JAX path (always available, the CPU/TPU default).
* ``"pallas"``: the Pallas kernel; on a backend without a compiled Pallas GPU path it runs
  in interpret mode (slow, for tests), unless ``interpret=False`` is forced.
* ``"auto"``: Pallas where its backend exists (``platform.CHOICES["pallas"]``: the
  target platform is CUDA), the reference elsewhere; the Velvet update also runs its
  Mosaic TPU kernel on a TPU target (``_velvet_update.choose_kernel``).

The process-wide default comes from ``set_default_impl(...)`` or, failing that, the
``VESPERJAX_KERNELS`` environment variable (``auto`` when unset). Attention has no Pallas
kernel of its own: there ``pallas`` means tokamax's kernels where tokamax is installed
(the platform's choice otherwise), ``reference`` the naive attention (``_attention``).
"""
import numbers
import os

from . import platform

IMPLS = ("auto", "pallas", "reference")
# Limits of a compiled Pallas-Triton kernel, which otherwise fail only at XLA:GPU compile
# time: elements of one Triton tensor (a block), and shared memory per block at sm_90's
# opt-in maximum (H100/H200; Pallas lowers for sm_90 without a GPU; an A100 has 166912).
TRITON_MAX_ELEMENTS = 1 << 20
SMEM_LIMIT_BYTES = 232448
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
  """True when Pallas compiles GPU kernels for the target platform (CUDA; ROCm, TPU and
  CPU are left to the reference)."""
  return platform.choice("pallas")


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


def check_block(name, value, *, minimum, compiled):
  """ValueError (one line) unless a user block size `value` is None or a power of two
  >= `minimum`, and, `compiled` for a GPU, at most TRITON_MAX_ELEMENTS."""
  if value is None:
    return
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
      or value & (value - 1)):
    raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")
  if compiled and value > TRITON_MAX_ELEMENTS:
    raise ValueError(f"{name}={value} exceeds Triton's limit of 2^20 = "
                     f"{TRITON_MAX_ELEMENTS} elements per compiled block")
