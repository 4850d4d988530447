"""Plans a GPU or TPU run on a CPU host: the real train step compiled for compile-only
devices of a target (XLA:GPU for a card, libtpu for a TPU slice), and what it needs.

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

On a TPU the sum does not hold: libtpu's `temp_size` is not the live figure (0 for a
small step whose peak holds 129 MiB beyond its arguments; 16.0 GiB at a batch whose peak
is 13.0 GiB), while its `peak_memory_in_bytes` counts the live buffers at the step's
high point, arguments and unaliased outputs included (checked on toy programs: a donated
update peaks at its argument, a sort at argument + scratch). libtpu judges a program by
that peak: it compiled a v5e step with temp + arguments over the chip's 15.75 GiB
available and a peak of 13.0 GiB, and refuses a program whose peak is over (its out-of-
memory error names the peak as "memory required"). So on a TPU `total` is the peak;
`code`, the compiled program (held in HBM), is listed beside it. A batch far over the
chip ends in that error, whose figure stands for the total (`compiler_refused`). The
same `mem_fraction` rule decides `fits` (a TPU has no 75% preallocation: there the
fraction is headroom).

`--max-batch`: memory is close to affine in the batch. Per remat policy it compiles two
batch sizes, fits a line, compiles the largest multiple of the mesh's batch divisor the
line puts under the budget, refits on the points that bracket the budget, and confirms
with a compile one step above the largest batch that fits: it ends when B fits and
B + divisor does not (typically 4-5 compiles; `plan_search.search_max_batch`).
"""
from __future__ import annotations

from vesperjax.planning import targets  # first: sets the deviceless compiles' environment

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
# libtpu's out-of-memory compile error, sizes in binary units (v5e: "exceeds available
# HBM (15.75G)", its 16 GiB less what libtpu reserves)
_TPU_OOM = re.compile(r"Ran out of memory .*?\(([\d.]+)([KMGT])\) exceeds available HBM "
                      r"\(([\d.]+)([KMGT])\)")


def _binary_bytes(number: str, unit: str) -> int:
  return int(float(number) * 2 ** (10 * "KMGT".index(unit) + 10))


# ---------------------------------------------------------------------------------------
# Checks that run before anything slow


def check_target(target: str, devices: int = 1, mem_fraction: float = 0.75,
                 topology: str | None = None) -> targets.Target:
  """The Target; a ValueError for an unknown target, a bad device count, topology or
  fraction, or no plugin / libtpu."""
  checked = targets.target(target, devices, topology)
  if not 0 < mem_fraction <= 1:
    raise ValueError(f"--mem-fraction must be in (0, 1], got {mem_fraction}")
  problem = checked.problem()
  if problem:
    raise ValueError(problem)
  return checked


def for_platform(run: RunConfig, platform: str, remat: str | None = None) -> RunConfig:
  """`run` built for `platform` ("cuda", "tpu"; whatever VESPERJAX_PLATFORM says), with
  `remat` if given."""
  run = run.replace(train=dict(platform=platform))
  if remat is not None:
    from vesperjax.config import REMAT_POLICIES
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; choose from "
                       f"{', '.join(REMAT_POLICIES)}")
    run = run.replace(model=dict(remat=remat))
  return run


class Program:
  """One run's train step on the compile-only devices of a target: `devices` of a GPU
  card, or the chips of a TPU `topology` (the generation's default when None).

  Building it checks the target and the mesh (a ValueError for an impossible one) and is
  cheap; `compile(batch_size)` is the slow part.
  """

  def __init__(self, run: RunConfig, target: str, devices: int = 1,
               topology: str | None = None):
    import jax

    from vesperjax import sharding
    from vesperjax.run_config import model_config
    self.target = targets.target(target, devices, topology)
    self.run = run
    devs = self.target.devices()
    self.num_devices, self.hosts = len(devs), len({d.process_index for d in devs})
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
    with self.target.deviceless(), jax.set_mesh(self.mesh):
      lowered = steps.train_step.trace(steps.abstract, batch).lower()
      lowered_at = time.perf_counter()
      try:
        compiled = lowered.compile()
      except Exception as e:  # noqa: BLE001  libtpu's JaxRuntimeError, matched below
        refused = _TPU_OOM.search(str(e)) if self.target.kind == "tpu" else None
        if refused is None:
          raise
        return self._refused(batch_size, refused, time.perf_counter() - start,
                             lowered_at - start)
    done = time.perf_counter()
    m = compiled.memory_analysis()
    if m is None:
      raise RuntimeError("XLA returned no memory analysis for the compiled step")
    mem = dict(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               aliased=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
               code=int(m.generated_code_size_in_bytes))
    mem["total"] = mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temp"]
    peak = getattr(m, "peak_memory_in_bytes", None)
    mem["xla_peak"] = int(peak) if peak else None
    if self.target.kind == "tpu":  # libtpu's own measure (module docstring)
      if not peak:
        raise RuntimeError("libtpu returned no peak memory for the compiled step")
      mem["total"] = mem["xla_peak"]
    out = dict(batch_size=batch_size, per_device_bytes=mem, compiler_refused=None,
               compile_s=round(done - start, 2), lower_s=round(lowered_at - start, 2))
    if details:
      text = compiled.as_text()
      out["collectives"] = dict(sorted(collections.Counter(
          c["kind"] for c in sharding.hlo_collectives(text)).items()))
      out["custom_calls"] = dict(sorted(collections.Counter(_CUSTOM_CALL.findall(text)).items()))
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out["xla_flops"] = float(cost["flops"]) if cost and "flops" in cost else None
    return out

  @staticmethod
  def _refused(batch_size: int, found: re.Match, seconds: float, lower_s: float) -> dict:
    """A compile libtpu refused for HBM: its required bytes stand for the total."""
    required = _binary_bytes(found[1], found[2])
    mem = dict(arguments=None, outputs=None, aliased=None, temp=None, code=None,
               total=required, xla_peak=None)
    return dict(batch_size=batch_size, per_device_bytes=mem,
                compiler_refused=dict(required_bytes=required,
                                      available_bytes=_binary_bytes(found[3], found[4]),
                                      message=found[0]),
                compile_s=round(seconds, 2), lower_s=round(lower_s, 2), collectives={},
                custom_calls={}, xla_flops=None)


def _budget(target: targets.Target, mem_fraction: float) -> int:
  return int(mem_fraction * target.device_memory_bytes)


# ---------------------------------------------------------------------------------------
# The API


def plan_step(run: RunConfig, *, target: str, devices: int = 1,
              topology: str | None = None, mem_fraction: float = 0.75,
              progress: Progress = None) -> dict:
  """Compile `run`'s train step for `devices` x a GPU `target`, or a TPU `target` slice of
  `topology`, at its batch size; the plan dict.

  Keys: target, kind ("gpu" | "tpu"), device_kind, devices (chips on a TPU), topology and
  hosts (TPU), mesh, batch_size, grad_accum, seq_len, vocab_size, remat, mem_fraction,
  params_total (trainable + frozen, from the abstract state), params_trainable,
  params_frozen, params_analytic (`model.size.num_params`), per_device_bytes (arguments,
  outputs, aliased, temp, code, total, xla_peak), compiler_refused (TPU: libtpu's
  out-of-memory error, else None), device_memory_bytes, budget_bytes, fits, compile_s,
  lower_s, collectives, custom_calls, choices (the dispatch table's row for the target's
  platform: what `auto` picks, first that applies), model_flops (per step,
  `flops_per_token` x tokens), xla_flops (per device, XLA's cost analysis, which counts a
  while loop's body once).
  """
  import jax

  from vesperjax.kernels import platform
  from vesperjax.training.train_step import flops_per_token
  checked = check_target(target, devices, mem_fraction, topology)
  run = for_platform(run, checked.platform)
  program = Program(run, target, devices, topology)
  program.check_batch(run.train.batch_size)
  log_progress(progress, f"compiling {run.model.preset} for {_where(program)} at batch "
               f"{run.train.batch_size} x {run.data.seq_len} ...")
  compiled = program.compile(run.train.batch_size)
  budget = _budget(checked, mem_fraction)
  total = compiled["per_device_bytes"]["total"]
  log_progress(progress,
               f"  {_gib(total)} per device, compiled in {compiled['compile_s']} s")
  t = run.train
  with platform.use(checked.platform):
    choices = {concept: platform.choice(concept) for concept in platform.CHOICES}
  where = dict(topology=checked.topology, hosts=program.hosts) if checked.kind == "tpu" \
      else {}
  return dict(
      target=target, kind=checked.kind, device_kind=checked.device_kind,
      devices=program.num_devices, **where, mesh=program.mesh_shape,
      preset=run.model.preset, batch_size=t.batch_size, grad_accum=t.grad_accum,
      seq_len=run.data.seq_len, vocab_size=program.vocab, remat=program.config.remat,
      **program.param_counts(), per_device_bytes=compiled["per_device_bytes"],
      compiler_refused=compiled["compiler_refused"],
      device_memory_bytes=checked.device_memory_bytes,
      mem_fraction=mem_fraction, budget_bytes=budget, fits=total <= budget,
      compile_s=compiled["compile_s"], lower_s=compiled["lower_s"],
      collectives=compiled["collectives"], custom_calls=compiled["custom_calls"],
      choices=choices, model_flops=flops_per_token(program.config, run.data.seq_len) * t.batch_size
      * t.grad_accum * run.data.seq_len,
      xla_flops=compiled["xla_flops"], jax=jax.__version__)


def _where(program: Program) -> str:
  t = program.target
  if t.kind == "tpu":
    return (f"{t.name} {t.topology} ({program.num_devices} chips, {program.hosts} "
            f"host{'s' if program.hosts > 1 else ''})")
  return f"{program.num_devices} x {t.name}"


def max_batch(run: RunConfig, *, target: str, devices: int = 1,
              topology: str | None = None, remat: str = "none",
              mem_fraction: float = 0.75, seed: Iterable = (), start: int | None = None,
              confirm_above: bool = True, progress: Progress = None) -> dict:
  """The largest global batch (a multiple of the mesh's batch divisor) that fits.

  Returns: remat, target, devices, topology (TPU), max_batch (0: not even one divisor's
  worth fits), per_device_bytes (total at max_batch), next_bytes (total at max_batch +
  divisor), compiles, points ([batch, total] compiled), divisor, budget_bytes, seq_len,
  capped, above_predicted. See `search_max_batch` for the hints `seed`, `start` and
  `confirm_above`.
  """
  checked = check_target(target, devices, mem_fraction, topology)
  run = for_platform(run, checked.platform, remat)
  program = Program(run, target, devices, topology)
  s = run.data.seq_len
  limit = min(2**20, (2**31 - 1) // ((s + 1) * run.train.grad_accum))
  log_progress(progress, f"max batch: {run.model.preset}, remat {remat}, "
               f"{_where(program)}, seq {s}, divisor {program.divisor}")
  found = search_max_batch(
      lambda b: program.compile(b, details=False)["per_device_bytes"]["total"],
      _budget(checked, mem_fraction), program.divisor, seed=seed, start=start,
      confirm_above=confirm_above, limit=limit, progress=progress)
  where = dict(topology=checked.topology) if checked.kind == "tpu" else {}
  return dict(remat=remat, target=target, devices=program.num_devices, **where,
              seq_len=s, **found)
