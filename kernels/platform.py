"""The target platform, and the one table of what each backend-dependent choice picks.

Every backend-dependent choice in vesperjax (compute dtype, Pallas vs reference,
attention implementation, cross-entropy path and logits reuse, MoE grouped-matmul
layout, CPU-only matmul forms) is a row of ``CHOICES``, read by ``choice(concept)`` for
``current()``, never for ``jax.default_backend()``: a train step traced for GPUs on a
CPU-only host (a deviceless compile, or ``lower(lowering_platforms=("cuda",))``) must get
the GPU graph.

``current()`` is, in order of precedence:

1. the platform set by ``use(platform)`` around the tracing (the train and eval steps
   set it from ``train.platform``, else the platform of the mesh's devices);
2. the ``VESPERJAX_PLATFORM`` environment variable;
3. the platform of ``jax.devices()[0]`` (the default backend).

Platforms: ``cpu``, ``cuda`` (``gpu`` is read as cuda), ``rocm``, ``tpu``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterable

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
ENV = "VESPERJAX_PLATFORM"
_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "amd": "rocm"}
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vesperjax_target_platform", default=None)


def normalize(name: str) -> str:
  """`name` as one of PLATFORMS (ValueError for anything else)."""
  key = str(name).strip().lower()
  key = _ALIASES.get(key, key)
  if key not in PLATFORMS:
    raise ValueError(f"unknown target platform {name!r}; choose from {', '.join(PLATFORMS)} "
                     "(or auto)")
  return key


def of_device(device) -> str:
  """The platform of one jax device (compile-only topology devices included)."""
  platform = device.platform.lower()
  if platform != "gpu":
    return normalize(platform)
  client = getattr(device, "client", None)
  names = f"{getattr(client, 'platform', '')} {getattr(client, 'platform_version', '')}"
  return "rocm" if "rocm" in names.lower() else "cuda"


def of_devices(devices: Iterable) -> str:
  """The one platform of `devices` (ValueError when they mix platforms)."""
  found = {of_device(d) for d in devices}
  if len(found) != 1:
    raise ValueError(f"devices span platforms {sorted(found)}: set the target platform")
  return found.pop()


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return of_device(jax.devices()[0])


def resolve(explicit: str | None = None, devices: Iterable | None = None) -> str:
  """The platform a program is built for: `explicit` (None / "auto": not given), else
  the environment variable, else the platform of `devices`, else the default backend."""
  if explicit is not None and str(explicit).strip().lower() != "auto":
    return normalize(explicit)
  env = os.environ.get(ENV, "").strip()
  if env and env.lower() != "auto":
    return normalize(env)
  if devices is not None:
    return of_devices(devices)
  return _default_backend()


def current() -> str:
  """The platform of the graph being traced now (see the module docstring)."""
  return _current.get() or resolve()


@contextlib.contextmanager
def use(platform: str):
  """Trace for `platform` inside this block (nests; restores the previous one)."""
  token = _current.set(normalize(platform))
  try:
    yield
  finally:
    _current.reset(token)


def traced_for(platform: str, fn: Callable) -> Callable:
  """`fn` with `use(platform)` around every call, so its tracing (under jit: its first
  call per input signature) makes the choices of `platform`."""
  platform = normalize(platform)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with use(platform):
      return fn(*args, **kwargs)

  return wrapped


# concept -> {target platform: what it picks}; "*" stands for every platform not listed.
# The module named beside each row holds its options and documents them.
CHOICES = {
    # compute dtype of "auto" (vesperjax.config.ModelConfig.compute_dtype)
    "compute_dtype": {"cpu": "float32", "*": "bfloat16"},
    # whether impl="auto" runs the Pallas kernels (_dispatch.resolve): compiled for CUDA
    "pallas": {"cuda": True, "*": False},
    # attention implementations of "auto", first one that applies (_attention.py): cuDNN
    # where it takes the inputs, tokamax (when installed) for the rest (fp32, head_dim
    # > 128) rather than XLA's [S, S] scores. TPU (benchmarks/tpu-choices/, small at S
    # 2048): splash attention holds 2.4 MiB of temporaries where blocked holds 56 and
    # XLA 768 (the [S, S] scores); splash and blocked both skip the masked half (XLA's
    # cost analysis cannot count a Mosaic kernel's FLOPs). Splash needs S a multiple of
    # 128 and runs per shard under a mesh (PER_SHARD_ATTENTION); blocked covers the rest
    "attention": {"cuda": ("cudnn", "tokamax", "xla"), "cpu": ("blocked", "reference"),
                  "tpu": ("splash", "blocked", "xla"), "*": ("xla",)},
    # linear cross-entropy of impl="auto" (_cross_entropy.py); CUDA may take "pallas" once
    # it is measured on a card. TPU: chunked, 0.4 MiB of temporaries where the full
    # logits take 1 GiB (N 8192, V 32768); tokamax's TPU loss returns no entropy
    "cross_entropy": {"tpu": "chunked", "*": "chunked"},
    # the chunked forward keeps its logits for the backward: memory is cheap on a host
    # (on TPU keeping them costs 1.25 GiB at the shapes above)
    "cross_entropy_keep_logits": {"cpu": True, "tpu": False, "*": False},
    # MoE grouped matmul of impl="auto", first one installed (_grouped_matmul.py):
    # XLA:CPU's and XLA:GPU's ragged_dot do every group's matmul over all rows, while
    # blocked wastes at most one block per group and tokamax runs grouped GEMM kernels.
    # TPU (benchmarks/tpu-choices/): XLA:TPU's ragged_dot runs the forward and dx as
    # Mosaic grouped GEMMs but dw as a dense product over a [G, rows, D] masked copy (G x
    # its FLOPs: 3.3x in all at 8 experts), blocked is 1.1x (more temporary memory);
    # tokamax's TPU kernel (1.0x) refuses to be partitioned outside a shard_map
    "grouped_matmul": {"cpu": "blocked", "cuda": ("tokamax", "blocked"),
                       "tpu": "blocked", "*": "ragged_dot"},
    # tokamax.ragged_dot's implementations, first one it supports on the device; not its
    # Mosaic TPU kernel: under a mesh it fails ("cannot be automatically partitioned")
    "tokamax_ragged_dot": {"cuda": ("mosaic", "triton", "xla"), "*": ("xla",)},
    # rows_matmul's weight gradient (_rows_matmul.py): XLA:CPU's fast dot wants x.T copied
    "rows_matmul_grad": {"cpu": "transpose_first", "*": "plain"},
    # the fused Velvet kernel's Pallas backend (_velvet_update.py), first one that applies:
    # Triton while jax ships it (sm80 and sm90); Mosaic GPU needs sm90 (TMA). The GPU
    # acceptance script times both; Hopper moves to Mosaic first if it wins there. TPU:
    # the Mosaic TPU kernel (_velvet_tpu.py), which libtpu compiles with the step, so
    # impl="auto" runs it there although the "pallas" row is off
    "velvet_kernel": {"tpu": ("tpu",), "*": ("triton", "mosaic")},
}


# attention implementations that are Mosaic kernels XLA cannot partition: under a mesh
# the model runs them per shard (vesperjax/model/attention.py)
PER_SHARD_ATTENTION = ("splash",)


def choice(concept: str):
  """What `concept` (a key of CHOICES) picks on the target platform `current()`."""
  options = CHOICES[concept]
  return options.get(current(), options["*"])
