"""TPU targets for deviceless compiles: libtpu on a host without a TPU.

libtpu (``pip install 'vesperjax[tpu-compile]'``: jax's own ``tpu`` extra pins it to the
installed jax) compiles for a TPU slice it is only told about:
``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4")``
gives compile-only devices (with ``process_index``: multi-host slices compile too), and a
jitted function traced on arguments placed on them compiles with every libtpu pass,
Pallas Mosaic TPU kernels included (compiled here, unlike Mosaic GPU's), and reports
per-device memory. No TPU runs anything.

Importing this module sets ``TPU_SKIP_MDS_QUERY=1`` (libtpu otherwise asks a GCE metadata
server for the host's TPU, a long timeout here) and ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``
(libtpu otherwise locks /tmp/libtpu_lockfile and a second process compiling at the same
time fails), unless they are set. Import it before anything loads libtpu.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import math
import os
import re

from vesperjax.planning.compile_only import no_compilation_cache

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One Cloud TPU generation, as the deviceless compile and the plan need it."""
  hbm_bytes: int  # per chip, Google's spec sheet
  chips_per_host: int  # chips of one TPU VM in a multi-host slice (spec sheet)
  default_topology: str  # the 8-TensorCore slice (v4-8, v5p-8) or 8-chip host (v5e-8)
  device_kind: str  # what jax reports for a chip of this generation
  dims: int  # topology dimensions: 2D torus (v5e, v6e) or 3D (v4, v5p)
  compiler_hbm_bytes: int  # what libtpu 0.0.42.1 compiles against ("available HBM")
  chip_config: str | None = None  # libtpu's chip config: megacore = one device per chip


# Spec sheets: https://cloud.google.com/tpu/docs/v4 (32 GiB HBM2, 4 chips per host,
# 2x2x1 = 1 host), https://cloud.google.com/tpu/docs/v5e (16 GiB, 8 chips per host,
# 2x4 = 1 host, 4x4 = 2), https://cloud.google.com/tpu/docs/v5p (95 GB HBM2e; 2x2x1 =
# 4 chips, 1 host), https://cloud.google.com/tpu/docs/v6e (32 GB, 8 chips per host).
# compiler_hbm_bytes: the "available HBM" in libtpu's out-of-memory error for one chip
# (30.75G, 15.75G, 95.74G, 31.25G), read from compiles of an oversized program here.
GENERATIONS = {
    "v4": Generation(32 << 30, 4, "2x2x1", "TPU v4", 3, int(30.75 * 2**30), "megacore"),
    "v5e": Generation(16 << 30, 8, "2x4", "TPU v5 lite", 2, int(15.75 * 2**30)),
    "v5p": Generation(95 << 30, 4, "2x2x1", "TPU v5", 3, int(95.74 * 2**30)),
    "v6e": Generation(32 << 30, 8, "2x4", "TPU v6 lite", 2, int(31.25 * 2**30)),
}
TARGETS = tuple(GENERATIONS)
_TOPOLOGY = re.compile(r"[1-9]\d*(x[1-9]\d*)+")


def generation(name: str) -> Generation:
  if name not in GENERATIONS:
    raise ValueError(f"unknown TPU target {name!r}; choose from {', '.join(TARGETS)}")
  return GENERATIONS[name]


def device_memory_bytes(name: str) -> int:
  """HBM of one chip of the generation, in bytes."""
  return generation(name).hbm_bytes


def device_kind(name: str) -> str:
  return generation(name).device_kind


def check_topology(name: str, topology: str | None = None) -> str:
  """The topology (`name`'s default when None) if it has the generation's shape; else a
  ValueError. Whether libtpu accepts it is known only when `devices` asks."""
  g = generation(name)
  topology = g.default_topology if topology is None else str(topology).strip()
  if not _TOPOLOGY.fullmatch(topology) or topology.count("x") + 1 != g.dims:
    example = "2x2x1" if g.dims == 3 else "2x4"
    raise ValueError(f"--topology {topology!r}: a {name} slice's topology is {g.dims}-D "
                     f"(e.g. {example})")
  return topology


def chips(topology: str) -> int:
  return math.prod(int(d) for d in topology.split("x"))


def host_bounds(name: str, topology: str) -> tuple[int, int, int] | None:
  """The chips of one host as libtpu's chips_per_host_bounds, or None for libtpu's
  default (2x2x1, 4 chips). One host holds a whole slice up to chips_per_host chips;
  v5e and v6e hosts of larger slices are 2x4 (4x4 = 2 hosts, as Google lists them)."""
  g = generation(name)
  dims = [int(d) for d in topology.split("x")] + [1] * (3 - g.dims)
  if chips(topology) <= g.chips_per_host:
    return tuple(dims)
  if g.chips_per_host == 8 and dims[0] % 2 == 0 and dims[1] % 4 == 0:
    return (2, 4, 1)
  return None


def libtpu_problem() -> str | None:
  """Why deviceless TPU compiles cannot run here (None when they can)."""
  import jax  # pylint: disable=g-import-not-at-top
  pins = [r.split(";")[0].strip() for r in importlib.metadata.requires("jax") or ()
          if r.startswith("libtpu") and 'extra == "tpu"' in r]
  install = "pip install 'vesperjax[tpu-compile]'"
  try:
    version = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return f"libtpu is not installed ({install}, which pins jax's own libtpu)"
  pin = re.fullmatch(r"libtpu\s*==\s*([\w.]+?)(\.\*)?", pins[0]) if pins else None
  if pin and not (version == pin[1] or (pin[2] and version.startswith(pin[1] + "."))):
    return f"libtpu {version} is not the one jax {jax.__version__} pins ({pins[0]}): {install}"
  return None


@functools.lru_cache(maxsize=None)
def devices(name: str, topology: str | None = None) -> tuple:
  """The compile-only chips of a `name` slice of `topology` (one device per chip); a
  ValueError for a topology libtpu refuses. Check `libtpu_problem` first."""
  g = generation(name)
  topology = check_topology(name, topology)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if g.chip_config:
    kwargs["chip_config_name"] = g.chip_config
  bounds = host_bounds(name, topology)
  if bounds:
    kwargs["chips_per_host_bounds"] = bounds
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=f"{name}:{topology}",
                                        **kwargs)
  except Exception as e:  # noqa: BLE001  libtpu's JaxRuntimeError: INVALID_ARGUMENT ...
    text = " ".join(str(e).split())
    raise ValueError(f"libtpu refuses --topology {topology} for {name}: "
                          f"{text[:300]}") from None
  return tuple(topo.devices)


def hosts(devs) -> int:
  return len({d.process_index for d in devs})


@contextlib.contextmanager
def deviceless(name: str):
  """Compile for TPU target `name` inside this block: the executables stay out of jax's
  persistent compilation cache (a compile-only client cannot read an entry back)."""
  generation(name)
  with no_compilation_cache():
    yield
