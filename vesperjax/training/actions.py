"""The training loop's periodic actions: each a callable on a finished step's
`StepInfo`, with no cadence of its own (`loop.Hook` holds when it runs). In the
trainer's order, with the cadence it registers:

  ThroughputWindow.count    every step: tokens/s over training time only
  MetricsSink.advance       every step: the progress bar
  LogMetrics                log steps and the last: fetches the step's metrics (the only
                            sync with the device on the training path) and writes them:
                            TensorBoard, metrics.jsonl, progress bar
  GuardDivergence.record    every step: the step's finite flag (no sync)
  GuardDivergence.check     log and save steps, and the last: stops a run whose steps
                            keep being skipped or whose loss spikes
  EvaluateAndKeepBest       eval steps and the last: validation loss, best checkpoint
  StopOnSignal              every step: the first SIGTERM/SIGINT stops after this step
  PeriodicCheckpoint        save steps: the latest checkpoint, never while steps are
                            being skipped
  ThroughputWindow.restart  eval and save steps: that time is not training time

Actions take plain values (callables, sizes), never the run config, and read no other
action's output.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from vesperjax.training import metrics_log
from vesperjax.training.divergence import DivergenceGuard
from vesperjax.training.loop import StepInfo

# Dense bf16 peak FLOP/s by device kind, for MFU; unknown devices (CPUs) report none.
# bf16 dense peak per chip; matched in order as a substring of jax's device_kind, so "TPU
# v5 lite" (v5e) comes before "TPU v5" (v5p, whose chips jax names "TPU v5")
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v6": 918e12}


def peak_flops(device_kind: str) -> float | None:
  """The peak bf16 FLOP/s of one chip of `device_kind`, None when unknown."""
  return next((peak for name, peak in PEAK_FLOPS.items()
               if name.lower() in device_kind.lower()), None)


def device_peak_flops() -> float | None:
  return peak_flops(jax.devices()[0].device_kind)


class ThroughputWindow:
  """Counts steps since the window opened; the first step of a run (it compiles) and
  the time spent evaluating or saving are left out."""

  def __init__(self, first_step: int, clock: Callable[[], float] = time.perf_counter):
    self.first_step, self.clock = first_step, clock
    self.reset()

  def reset(self) -> None:
    self.start, self.steps = self.clock(), 0

  def count(self, info: StepInfo) -> None:
    self.steps += 1
    if self.steps == 1 and info.step == self.first_step:  # compiling happened in that call
      self.reset()

  def steps_per_s(self) -> float | None:
    return self.steps / (self.clock() - self.start) if self.steps else None

  def restart(self, info: StepInfo) -> None:
    """After an eval or a save: the window reopens."""
    self.reset()


class MetricsSink:
  """Scalars to TensorBoard (WORKDIR/tb), WORKDIR/metrics.jsonl (`metrics_log`: repaired
  for a run continuing after `step` before anything is appended) and, when given, a
  tracker (`wandb_tracking.WandbRun`: `log(step, scalars)`, `finish(exit_code)`), and
  the progress bar; process 0 only (elsewhere every method does nothing)."""

  def __init__(self, workdir: str, max_steps: int, step: int, tracker: Any = None):
    self.workdir = workdir
    self.writer = self.bar = self.tracker = None
    if jax.process_index() != 0:
      return
    self.path = os.path.join(workdir, metrics_log.FILE)
    # a crash may have torn the last line, and rows after `step` are logged again
    for note in metrics_log.prepare_for_append(self.path, step):
      print(note, file=sys.stderr, flush=True)
    from tensorboardX import SummaryWriter
    from tqdm import tqdm
    self.writer = SummaryWriter(os.path.join(workdir, "tb"))
    self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True,
                    mininterval=1.0, file=sys.stderr)
    self.tracker = tracker

  def advance(self, info: StepInfo) -> None:
    if self.bar is not None:
      self.bar.update(1)

  def write(self, step: int, scalars: dict) -> None:
    if self.writer is None:
      return
    for k, v in scalars.items():
      self.writer.add_scalar(k, v, step)
    with open(self.path, "a") as f:
      f.write(metrics_log.encode(step, scalars))
    if self.tracker is not None:
      self.tracker.log(step, scalars)

  def postfix(self, **values) -> None:
    if self.bar is not None:
      self.bar.set_postfix(refresh=False, **values)

  def close(self, exit_code: int = 0) -> None:
    """Idempotent; the tracker's run ends with `exit_code` (the process's exit status)."""
    for thing in (self.writer, self.bar):
      if thing is not None:
        thing.close()
    tracker, self.writer, self.bar, self.tracker = self.tracker, None, None, None
    if tracker is not None:
      tracker.finish(exit_code)


def step_scalars(host: dict, step: int, lr: Callable[[int], Any], tokens_per_s,
                 flops_per_token: float, peak: float | None) -> dict:
  """The logged scalars of one step's fetched metrics (+ perplexity, LR, tokens/s, MFU,
  each expert's share of the routed tokens)."""
  scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
  scalars["perplexity"] = math.exp(min(scalars["loss"], 50))
  if "learning_rate" not in scalars:  # adamw: the schedule's value
    scalars["learning_rate"] = float(lr(step - 1))
  if tokens_per_s is not None:
    scalars["tokens_per_s"] = tokens_per_s
    if peak:
      scalars["mfu"] = tokens_per_s * flops_per_token / (peak * jax.device_count())
  if "expert_load" in host:  # [layers, experts]: each expert's share, layer-averaged
    load = np.asarray(host["expert_load"]).mean(0)
    scalars.update({f"expert_load/{i}": float(x) for i, x in enumerate(load)})
    scalars["expert_load/max_over_mean"] = float(load.max() * load.size)
  return scalars


class LogMetrics:
  """Fetch, compute and write the step's scalars."""

  def __init__(self, sink: MetricsSink, window: ThroughputWindow, *, tokens_per_step: int,
               lr, flops_per_token: float, peak: float | None,
               data_shares: Callable[[int], dict] | None = None):
    self.sink, self.window = sink, window
    self.data_shares = data_shares  # step -> `data/share/NAME` scalars (a mixture's)
    self.tokens_per_step, self.lr = tokens_per_step, lr
    self.flops, self.peak = flops_per_token, peak
    self.last_loss = None

  def __call__(self, info: StepInfo) -> None:
    host = jax.device_get(info.metrics)
    rate = self.window.steps_per_s()
    tps = None if rate is None else rate * self.tokens_per_step
    scalars = step_scalars(host, info.step, self.lr, tps, self.flops, self.peak)
    if self.data_shares is not None:
      scalars.update(self.data_shares(info.step))
    self.sink.write(info.step, scalars)
    self.sink.postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tps or 0:,.0f}")
    self.window.reset()
    self.last_loss = scalars["loss"]


class GuardDivergence:
  """`record`: each step's finite flag (no sync); `check` (on log and save steps, so a
  save never keeps a diverging state): asks the guard, and stops the loop with
  `diverged` set."""

  def __init__(self, guard: DivergenceGuard):
    self.guard = guard
    self.diverged: str | None = None

  def record(self, info: StepInfo) -> None:
    self.guard.record(info.metrics["finite"])

  def check(self, info: StepInfo) -> None:
    self.diverged = self.guard.check(info.step, float(info.metrics["loss"]))
    if self.diverged:
      info.stop = "diverged"


class EvaluateAndKeepBest:
  """The validation loss, logged, and the state kept as the best checkpoint when it
  beats every earlier one (and is finite). `extra_metrics()`: more numbers of the same
  evaluation, logged beside it."""

  def __init__(self, evaluate: Callable[[Any], float | None],
               save_best: Callable[[int, Any, float], Any], finite: Callable[[Any], bool],
               sink: MetricsSink, extra_metrics: Callable[[], dict] | None = None):
    self.evaluate = evaluate
    self.save_best, self.finite, self.sink = save_best, finite, sink
    self.extra_metrics = extra_metrics
    self.eval_loss = None

  def __call__(self, info: StepInfo) -> None:
    self.eval_loss = self.evaluate(info.state)
    if self.eval_loss is None:
      return
    self.sink.write(info.step, {"eval_loss": self.eval_loss,
                                "eval_perplexity": math.exp(min(self.eval_loss, 50)),
                                **(self.extra_metrics() if self.extra_metrics else {})})
    if self.finite(info.state):
      self.save_best(info.step, info.state, self.eval_loss)


class Signals:
  """First SIGTERM/SIGINT asks for a clean stop (emergency save); a second exits at once."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:
      os._exit(128 + signum)
    self.received = signum
    print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
          "(send again to exit at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class StopOnSignal:
  def __init__(self, signals: Signals):
    self.signals = signals

  def __call__(self, info: StepInfo) -> None:
    if self.signals.received is not None:
      info.stop = signal.Signals(self.signals.received).name


class PeriodicCheckpoint:
  """Save the latest checkpoint, unless the last steps were skipped (a run that is
  diverging keeps its last good checkpoint as the latest)."""

  def __init__(self, save: Callable[[int, Any], Any], guard: DivergenceGuard,
               log: Callable[[str], None]):
    self.save, self.guard, self.log = save, guard, log

  def __call__(self, info: StepInfo) -> None:
    if self.guard.streak:
      self.log(f"step {info.step}: not saved while steps are being skipped")
    else:
      self.save(info.step, info.state)
