"""The training loop: data -> jit step -> periodic actions; resumable exactly.

`build.build_run` sets everything up (mesh, data, model, steps, state, checkpointer); the
device side lives in `train_step`; what happens between steps (logging, evaluation with
the best checkpoint, the divergence guard, signals, checkpoints) are the small actions of
`vesperjax.training.actions`. This module feeds batches, runs the actions after each step, and
saves at the end or before failing. Metrics are fetched from the device only on log
steps, so the host never waits on a step it did not need to see.
"""
from __future__ import annotations

import dataclasses
import math
import signal
from typing import TYPE_CHECKING

import jax
import numpy as np

from vesperjax.training import actions as act
from vesperjax.training import calibration
from vesperjax import data as vdata
from vesperjax import sharding
from vesperjax.training import wandb_tracking
from vesperjax.training.actions import device_peak_flops
# RunError is imported from here too (tests)
from vesperjax.training.build import RunError, build_run, log_line  # noqa: F401
from vesperjax.checkpoint import CheckpointSaveError
from vesperjax.training.divergence import DivergenceGuard
from vesperjax.training.loop import Hook, StepLoop
from vesperjax.run_config import as_run_config
from vesperjax.training.train_step import all_finite, flops_per_token

if TYPE_CHECKING:
  from ml_collections import ConfigDict

  from vesperjax.run_config import RunConfig


@dataclasses.dataclass
class Outcome:
  step: int
  last_loss: float | None
  eval_loss: float | None
  skipped: int
  stopped_by: str | None = None


class Trainer:
  """One training run in WORKDIR: `train()` it, then `close()` (releases the workdir).

  `run`: a RunConfig, or an experiment's ConfigDict (converted and validated by
  `build_run`); `self.run` is the RunConfig.
  """

  def __init__(self, run: RunConfig | ConfigDict, workdir: str, *,
               require_resume: bool = False):
    self.workdir = workdir
    run = as_run_config(run)
    if run.train.wandb and jax.process_index() == 0:  # fail before any data or compile
      wandb_tracking.require_wandb()
    self.built = build_run(run, workdir, require_resume=require_resume,
                           log=lambda text: self._log_line(text))
    self.run: RunConfig = self.built.run
    self.state = self.built.state  # the loop's, from here on
    self.eval_extras: dict[str, float] = {}  # the last evaluation's calibration numbers
    self.all_finite = jax.jit(lambda s: all_finite((s.params, s.opt_state)))

  # -- batches -------------------------------------------------------------------------
  def _next_batch(self) -> jax.Array:
    host = np.stack([next(self.built.data_iter) for _ in range(self.run.train.grad_accum)])
    return sharding.global_batch_from_host(host.astype(np.int32), self.built.model.mesh,
                                           self.built.model.steps.batch_sharding)

  def evaluate(self, state=None) -> float | None:
    """Mean validation token loss of `state` (default: the current one), or None when
    the run has no validation data or evaluates no batches."""
    t, model = self.run.train, self.built.model
    val = self.built.data.val_cache
    if val is None or t.eval_batches == 0:
      return None
    state = self.state if state is None else state
    total, count, stats = 0.0, 0.0, {}
    with jax.set_mesh(model.mesh):
      for host in vdata.eval_batches(val, t.batch_size, self.run.data.seq_len, t.eval_batches):
        batch = sharding.global_batch_from_host(host.astype(np.int32), model.mesh,
                                                model.steps.eval_sharding)
        if model.steps.eval_calibration is None:
          loss_sum, n = model.steps.eval_step(state, batch)
        else:  # the meta head: the same loss, and its calibration sums
          loss_sum, n, batch_stats = model.steps.eval_calibration(state, batch)
          stats = {k: calibration.add_stats(stats.get(k), v)
                   for k, v in jax.device_get(batch_stats).items()}
        total, count = total + float(loss_sum), count + float(n)
    self.eval_extras = calibration.eval_metrics(stats) if stats else {}
    return total / count

  # -- the loop ------------------------------------------------------------------------
  def train(self, stop_at: int | None = None) -> Outcome:
    """Train to train.max_steps (or to `stop_at`, checkpointing there as at a signal)."""
    s, seq_len = self.run.train, self.run.data.seq_len
    end = s.max_steps if stop_at is None else min(stop_at, s.max_steps)
    step = int(self.state.step)
    tracker = self._start_tracker(step) if step < end else None  # no steps, no W&B run
    sink = act.MetricsSink(self.workdir, s.max_steps, step, tracker)
    window = act.ThroughputWindow(step + 1)
    guard = act.GuardDivergence(DivergenceGuard(s.max_skipped_steps, s.loss_spike_factor))
    log = act.LogMetrics(sink, window, lr=self.built.model.lr,
                         tokens_per_step=s.batch_size * s.grad_accum * seq_len,
                         flops_per_token=flops_per_token(self.built.model.config, seq_len),
                         peak=device_peak_flops(),
                         data_shares=lambda step: self.built.data.share_scalars(
                             step * s.batch_size * s.grad_accum))
    evaluate = act.EvaluateAndKeepBest(self.evaluate, self.built.ckpt.save_best, self._finite,
                                       sink, extra_metrics=lambda: self.eval_extras)
    # under the ambient mesh the model pins activations and the MoE goes expert-parallel
    with act.Signals() as signals, jax.set_mesh(self.built.model.mesh):
      hooks = [Hook(window.count), Hook(sink.advance),
               Hook(log, s.log_every, at_end=True),
               Hook(guard.record),
               Hook(guard.check, (s.log_every, s.save_every), at_end=True),
               Hook(evaluate, s.eval_every, at_end=True),
               Hook(act.StopOnSignal(signals)),
               Hook(act.PeriodicCheckpoint(self._save, guard.guard, self._log_line),
                    s.save_every),
               Hook(window.restart, (s.eval_every, s.save_every))]
      loop = StepLoop(self.built.model.steps.train_step, self._next_batch, hooks, self.state, step,
                      last=s.max_steps)
      exit_code = 1  # the tracker's, until the run ends as planned
      try:
        try:
          stop = loop.run(end)
        except CheckpointSaveError:
          raise  # saving is what failed: another try would only fail again
        except Exception:
          self.state = loop.state
          sink.close(exit_code)  # the progress bar ends before the lines that follow
          self._save_before_failing(loop.step)
          raise
        self.state, step = loop.state, loop.step
        if not guard.diverged:  # a diverged state is not saved: the last good one stays
          self._save(step, force=True)
        self.built.ckpt.wait()
        exit_code = exit_status(stop, guard.diverged)
      finally:
        sink.close(exit_code)  # before the error line, if any
    if guard.diverged:
      raise RunError(f"the run diverged at {guard.diverged}; the latest checkpoint is step "
                     f"{self.built.ckpt.latest_step()}")
    return Outcome(step, log.last_loss, evaluate.eval_loss, int(self.state.skipped), stop)

  def _start_tracker(self, step: int):
    """The W&B run of `train.wandb` (process 0), resumed when training resumes."""
    t = self.run.train
    if not t.wandb or jax.process_index() != 0:
      return None
    abstract = self.built.model.steps.abstract
    count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    config = {**self.run.to_dict(), "model_config": self.built.model.config.to_dict(),
              "params_trainable": count(abstract.params),
              "params_frozen": count(abstract.rest)}
    return wandb_tracking.WandbRun.start(
        self.workdir, project=t.wandb_project, entity=t.wandb_entity, name=t.wandb_name,
        tags=t.wandb_tags, config=config, resumed=step > 0)

  # -- saving --------------------------------------------------------------------------
  def _finite(self, state=None) -> bool:
    return bool(self.all_finite(self.state if state is None else state))

  def _save(self, step: int, state=None, *, force: bool = False):
    """Checkpoint `state` (default: the current one) as step `step`, unless that step is
    saved already or the state is not finite."""
    state = self.state if state is None else state
    if self.built.ckpt.latest_step() == step:
      return
    if not self._finite(state):
      self._log_line(f"step {step}: state is not finite; checkpoint not saved")
      return
    self.built.ckpt.save(step, state, self.built.data_iter, force=force)

  def _save_before_failing(self, step: int):
    """An error inside the loop: keep the steps since the last checkpoint if the state is
    still whole (a failure inside the step may have consumed its donated buffers)."""
    try:
      self._save(step, force=True)
      self.built.ckpt.wait()
      self._log_line(f"saved step {step} before failing")
    except Exception as e:  # noqa: BLE001  (the original error is what matters)
      self._log_line(f"step {step} could not be saved before failing: "
                     f"{' '.join(str(e).split())[:200]}")

  def _log_line(self, text: str):
    log_line(text)

  def close(self):
    """Close the checkpointer and release the workdir (idempotent)."""
    self.built.close()


def exit_status(stop: str | None, diverged: str | None) -> int:
  """The training command's exit status for how the loop ended: 0 (done), 2 (diverged,
  a RunError), 128 + the signal number (stopped by SIGTERM or SIGINT)."""
  if diverged:
    return 2
  if stop in ("SIGTERM", "SIGINT"):
    return 128 + signal.Signals[stop].value
  return 0
