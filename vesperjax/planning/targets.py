"""The targets a plan compiles for, behind one interface: GPU cards (`gpu_targets`: N
devices of one host) and TPU generations (`tpu_targets`: a slice of a topology).

Importing this module sets both deviceless compiles' environment (the CUDA plugin's
constraints check, libtpu's metadata query and lock file): import it before anything
initialises jax's backends.
"""
from __future__ import annotations

import dataclasses

from vesperjax.planning import gpu_targets, tpu_targets

NAMES = gpu_targets.TARGETS + tpu_targets.TARGETS


@dataclasses.dataclass(frozen=True)
class Target:
  """A checked target: `name` with `count` devices (GPU) or a slice of `topology` (TPU).
  Building one is cheap; `devices()` loads the plugin or libtpu."""
  name: str
  count: int = 1
  topology: str | None = None

  @property
  def kind(self) -> str:
    return "tpu" if self.name in tpu_targets.TARGETS else "gpu"

  @property
  def platform(self) -> str:
    """The train step's target platform (`train.platform`)."""
    return "tpu" if self.kind == "tpu" else "cuda"

  @property
  def _module(self):
    return tpu_targets if self.kind == "tpu" else gpu_targets

  @property
  def device_memory_bytes(self) -> int:
    return self._module.device_memory_bytes(self.name)

  @property
  def device_kind(self) -> str:
    return self._module.device_kind(self.name)

  def problem(self) -> str | None:
    """Why this target's deviceless compile cannot run here (None when it can)."""
    if self.kind == "tpu":
      problem = tpu_targets.libtpu_problem()
      return problem and f"deviceless TPU compile unavailable: {problem}"
    problem = gpu_targets.plugin_problem()
    return problem and f"deviceless GPU compile unavailable: {problem}"

  def devices(self) -> tuple:
    """The compile-only devices (a ValueError where they cannot be had)."""
    problem = self.problem()
    if problem:
      raise ValueError(problem)
    if self.kind == "tpu":
      return tpu_targets.devices(self.name, self.topology)
    try:
      return gpu_targets.devices(self.name, self.count)
    except gpu_targets.TargetUnavailable as e:
      raise ValueError(str(e)) from None

  def deviceless(self):
    """The context to trace, lower and compile for this target in."""
    return self._module.deviceless(self.name)


def target(name: str, devices: int = 1, topology: str | None = None) -> Target:
  """A Target after the cheap checks (a ValueError for an unknown name, a bad device count
  or topology shape, a topology for a GPU or a device count for a TPU)."""
  if name not in NAMES:
    raise ValueError(f"unknown --target {name!r}; choose from GPUs "
                     f"{', '.join(gpu_targets.TARGETS)} or TPUs "
                     f"{', '.join(tpu_targets.TARGETS)}")
  if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise ValueError(f"--devices must be a positive integer, got {devices!r}")
  if name in tpu_targets.TARGETS:
    if devices != 1:
      raise ValueError(f"--devices is for GPU targets; a {name} slice's chips come from "
                       "--topology")
    topology = tpu_targets.check_topology(name, topology)
    return Target(name, tpu_targets.chips(topology), topology)
  if topology is not None:
    raise ValueError(f"--topology is for TPU targets; {name} takes --devices")
  return Target(name, devices)
