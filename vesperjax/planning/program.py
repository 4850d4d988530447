"""Plans a GPU run on a CPU host: the real train step compiled with XLA:GPU for
compile-only devices of a target card, and what it needs.

Memory (per device, from `compiled.memory_analysis()`): XLA:GPU allocates, for one
execution, every argument buffer (the train state and the token batch: already resident),
every output buffer that is not aliased to an argument, and one temporary block of
`temp_size` bytes that holds all intermediates (buffer assignment reuses it across
their live ranges). The state is donated, so the new state is written into the old
state's buffers: those outputs are counted in `alias_size` and take no new memory.
Everything is allocated before the first kernel runs, so what must be resident at peak is

    total = arguments + outputs - aliased + temp

(outputs - aliased is the metrics, a few hundred bytes). XLA's own `peak_memory_in_bytes`
(reported as `xla_peak`) is a heap simulation over buffer live ranges and comes out a few
KiB lower; `total` is what the allocator needs. `fits` compares `total` with
`mem_fraction` x the card's memory: JAX preallocates 75% of the GPU
(XLA_PYTHON_CLIENT_MEM_FRACTION=.75) and XLA's allocator serves programs from that pool.
Not in the figure: the CUDA context, and workspaces of custom calls that are built on the
device at run time (cuDNN attention compiles with a zero-byte workspace here; Mosaic GPU
kernels likewise), so leave some headroom.

`--max-batch`: memory is close to affine in the batch. Per remat policy it compiles two
batch sizes, fits a line, compiles the largest multiple of the mesh's batch divisor the
line puts under the budget, refits on the points that bracket the budget, and confirms
with a compile one step above the largest batch that fits: it ends when B fits and
B + divisor does not (typically 4-5 compiles; `plan_search.search_max_batch`).
"""
from __future__ import annotations

from vesperjax.planning import gpu_targets  # noqa: F401  first: sets JAX_SKIP_CUDA_CONSTRAINTS_CHECK

import collections
import dataclasses
import math
import re
import time
from typing import TYPE_CHECKING, Iterable

from vesperjax.planning.search import DEFAULT_VOCAB, Progress, log_progress, search_max_batch
from vesperjax.planning.search import fmt_bytes as _gib

if TYPE_CHECKING:
  from vesperjax.run_config import RunConfig

_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


# ---------------------------------------------------------------------------------------
# Checks that run before anything slow


def check_target(target: str, devices: int = 1, mem_fraction: float = 0.75) -> None:
  """ValueError for an unknown target, a bad device count or fraction, or no plugin."""
  if target not in gpu_targets.TARGETS:
    raise ValueError(f"unknown --target {target!r}; choose from "
                     f"{', '.join(gpu_targets.TARGETS)}")
  if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
    raise ValueError(f"--devices must be a positive integer, got {devices!r}")
  if not 0 < mem_fraction <= 1:
    raise ValueError(f"--mem-fraction must be in (0, 1], got {mem_fraction}")
  problem = gpu_targets.plugin_problem()
  if problem:
    raise ValueError(f"deviceless GPU compile unavailable: {problem}")


def for_cuda(run: RunConfig, remat: str | None = None) -> RunConfig:
  """`run` built for CUDA (whatever VESPERJAX_PLATFORM says), with `remat` if given."""
  run = run.replace(train=dict(platform="cuda"))
  if remat is not None:
    from vesperjax.config import REMAT_POLICIES
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; choose from "
                       f"{', '.join(REMAT_POLICIES)}")
    run = run.replace(model=dict(remat=remat))
  return run


class Program:
  """One run's train step on `devices` compile-only devices of `target`.

  Building it checks the mesh (a ValueError for an impossible one) and is cheap;
  `compile(batch_size)` is the slow part.
  """

  def __init__(self, run: RunConfig, target: str, devices: int = 1):
    import jax

    from vesperjax import sharding
    from vesperjax.run_config import model_config
    self.run, self.target, self.num_devices = run, target, devices
    try:
      devs = gpu_targets.devices(target, devices)
    except gpu_targets.TargetUnavailable as e:
      raise ValueError(str(e)) from None
    self.mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=list(devs))
    self.divisor = sharding.batch_divisor(self.mesh)
    self.vocab = run.model.vocab_size or DEFAULT_VOCAB
    self.config = model_config(run, self.vocab)
    self._steps = None
    self._jax = jax

  @property
  def mesh_shape(self) -> dict:
    return {k: int(v) for k, v in self.mesh.shape.items()}

  def check_batch(self, batch_size: int) -> None:
    if batch_size < 1 or batch_size % self.divisor:
      shape = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
      raise ValueError(f"train.batch_size={batch_size} is not a positive multiple of "
                       f"{self.divisor}, the batch split of the mesh ({shape})")

  @property
  def steps(self):
    if self._steps is None:
      from vesperjax.training.train_step import sharded_steps
      o, t = self.run.optim, self.run.train
      self._steps = sharded_steps(self.config, self.mesh, optim=o, max_steps=t.max_steps,
                                  valid_vocab=self.vocab, fused_loss=t.fused_loss,
                                  platform=t.platform)
    return self._steps

  def param_counts(self) -> dict:
    from vesperjax.model.size import num_params
    count = lambda tree: sum(math.prod(x.shape) for x in self._jax.tree.leaves(tree))
    trainable, frozen = count(self.steps.abstract.params), count(self.steps.abstract.rest)
    return dict(params_total=trainable + frozen, params_trainable=trainable,
                params_frozen=frozen, params_analytic=num_params(self.config))

  def compile(self, batch_size: int, *, details: bool = True) -> dict:
    """Compile the step for a global batch; per-device bytes (+ HLO facts if details)."""
    jax = self._jax
    import jax.numpy as jnp

    from vesperjax import sharding
    steps, t = self.steps, self.run.train
    batch = jax.ShapeDtypeStruct((t.grad_accum, batch_size, self.run.data.seq_len + 1),
                                 jnp.int32, sharding=steps.batch_sharding)
    start = time.perf_counter()
    with gpu_targets.deviceless(self.target), jax.set_mesh(self.mesh):
      lowered = steps.train_step.trace(steps.abstract, batch).lower()
      lowered_at = time.perf_counter()
      compiled = lowered.compile()
    done = time.perf_counter()
    m = compiled.memory_analysis()
    if m is None:
      raise RuntimeError("XLA returned no memory analysis for the compiled step")
    mem = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               aliased=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))
    mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temp"]
    peak = getattr(m, "peak_memory_in_bytes", None)
    mem["xla_peak"] = int(peak) if peak else None
    out = dict(batch_size=batch_size, per_device_bytes=mem,
               compile_s=round(done - start, 2), lower_s=round(lowered_at - start, 2))
    if details:
      text = compiled.as_text()
      out["collectives"] = dict(sorted(collections.Counter(
          c["kind"] for c in sharding.hlo_collectives(text)).items()))
      out["custom_calls"] = dict(sorted(collections.Counter(_CUSTOM_CALL.findall(text)).items()))
    return out


def _budget(target: str, mem_fraction: float) -> int:
  return int(mem_fraction * gpu_targets.device_memory_bytes(target))


# ---------------------------------------------------------------------------------------
# The API


def plan_step(run: RunConfig, *, target: str, devices: int = 1, mem_fraction: float = 0.75,
              progress: Progress = None) -> dict:
  """Compile `run`'s train step for `devices` x `target` at its batch size; the plan dict.

  Keys: target, device_kind, devices, mesh, batch_size, grad_accum, seq_len, vocab_size,
  remat, mem_fraction, params_total (trainable + frozen, from the abstract state),
  params_trainable, params_frozen, params_analytic (`model.size.num_params`),
  per_device_bytes (arguments, outputs, aliased, temp, total, xla_peak),
  device_memory_bytes, budget_bytes, fits, compile_s, lower_s, collectives, custom_calls.
  """
  import jax
  check_target(target, devices, mem_fraction)
  run = for_cuda(run)
  program = Program(run, target, devices)
  program.check_batch(run.train.batch_size)
  log_progress(progress, f"compiling {run.model.preset} for {devices} x {target} at "
               f"batch {run.train.batch_size} x {run.data.seq_len} ...")
  compiled = program.compile(run.train.batch_size)
  budget = _budget(target, mem_fraction)
  total = compiled["per_device_bytes"]["total"]
  log_progress(progress,
               f"  {_gib(total)} per device, compiled in {compiled['compile_s']} s")
  return dict(
      target=target, device_kind=gpu_targets.device_kind(target), devices=devices,
      mesh=program.mesh_shape, preset=run.model.preset,
      batch_size=run.train.batch_size, grad_accum=run.train.grad_accum,
      seq_len=run.data.seq_len, vocab_size=program.vocab, remat=program.config.remat,
      **program.param_counts(), per_device_bytes=compiled["per_device_bytes"],
      device_memory_bytes=gpu_targets.device_memory_bytes(target),
      mem_fraction=mem_fraction, budget_bytes=budget, fits=total <= budget,
      compile_s=compiled["compile_s"], lower_s=compiled["lower_s"],
      collectives=compiled["collectives"], custom_calls=compiled["custom_calls"],
      jax=jax.__version__)


def max_batch(run: RunConfig, *, target: str, devices: int = 1, remat: str = "none",
              mem_fraction: float = 0.75, seed: Iterable = (), start: int | None = None,
              confirm_above: bool = True, progress: Progress = None) -> dict:
  """The largest global batch (a multiple of the mesh's batch divisor) that fits.

  Returns: remat, max_batch (0: not even one divisor's worth fits), per_device_bytes
  (total at max_batch), next_bytes (total at max_batch + divisor), compiles, points
  ([batch, total] compiled), divisor, budget_bytes, seq_len, capped, above_predicted.
  See `search_max_batch` for the hints `seed`, `start` and `confirm_above`.
  """
  check_target(target, devices, mem_fraction)
  run = for_cuda(run, remat)
  program = Program(run, target, devices)
  s = run.data.seq_len
  limit = min(2**20, (2**31 - 1) // ((s + 1) * run.train.grad_accum))
  log_progress(progress, f"max batch: {run.model.preset}, remat {remat}, {devices} x "
               f"{target}, seq {s}, divisor {program.divisor}")
  found = search_max_batch(
      lambda b: program.compile(b, details=False)["per_device_bytes"]["total"],
      _budget(target, mem_fraction), program.divisor, seed=seed, start=start,
      confirm_above=confirm_above, limit=limit, progress=progress)
  return dict(remat=remat, target=target, devices=devices, seq_len=s, **found)
