"""The training loop: data -> jit step -> logs, evals, checkpoints; resumable exactly.

Everything device-side lives in `train_step`; this module only feeds batches, decides
when to log / evaluate / save, and handles signals. Metrics are fetched from the device
only on log steps, so the host never waits on a step it did not need to see.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from vesperjax import data as vdata
from vesperjax import sharding
from vesperjax.checkpoint import Checkpointer, read_json
from vesperjax.config import EXECUTION_FIELDS, ModelConfig
from vesperjax.divergence import DivergenceGuard
from vesperjax.run_config import model_config
from vesperjax.train_step import all_finite, flops_per_token, lr_schedule, sharded_steps
from vesperjax.workdir_lock import acquire_for_job, describe_holder

# Dense bf16 peak FLOP/s by device kind, for MFU; unknown devices (CPUs) report none.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12}


class RunError(RuntimeError):
  """A run that cannot start or continue as configured (one-line message)."""


def device_peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return peak
  return None


class _Signals:
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


@dataclasses.dataclass
class Outcome:
  step: int
  last_loss: float | None
  eval_loss: float | None
  skipped: int
  stopped_by: str | None = None


class Trainer:

  def __init__(self, run: ConfigDict, workdir: str, *, require_resume: bool = False):
    self.run, self.workdir = run, workdir
    self.is_main = jax.process_index() == 0
    t = run.train
    # everything checkable without data first: a bad config fails before tokenizing
    self.mesh = sharding.make_mesh(**run.mesh)
    shards = sharding.batch_divisor(self.mesh)
    if t.batch_size % shards:
      raise RunError(f"config.train.batch_size={t.batch_size} must be a multiple of the "
                     f"{shards} batch shards of the mesh {dict(self.mesh.shape)}")
    model_config(run)
    os.makedirs(workdir, exist_ok=True)
    self._lock = acquire_for_job(workdir)  # before anything in the workdir is touched
    if self._lock is not None and self._lock.previous:
      self._log_line(f"{workdir}: took over the lock of a trainer that is gone "
                     f"({describe_holder(self._lock.previous)})")
    try:
      self._setup(require_resume)
    except BaseException:
      self.close()
      raise

  def _setup(self, require_resume: bool):
    run, workdir, t = self.run, self.workdir, self.run.train
    self._prepare_data()
    self.config = model_config(run, vdata.padded_vocab_size(self.tokenizer.vocab_size))
    self._check_run_dir()
    if run.data.seq_len > self.config.max_seq_len:
      raise RunError(f"config.data.seq_len={run.data.seq_len} exceeds the model's "
                     f"max_seq_len={self.config.max_seq_len}")
    self.schedule = lr_schedule(run.optim, t.max_steps)
    steps = sharded_steps(self.config, run, self.mesh, valid_vocab=self.tokenizer.vocab_size)
    self.graphdef, self.abstract = steps.graphdef, steps.abstract
    self.batch_sharding, self.eval_sharding = steps.batch_sharding, steps.eval_sharding
    self.train_step, self.eval_step = steps.train_step, steps.eval_step
    self.all_finite = jax.jit(lambda s: all_finite((s.params, s.opt_state)))

    self.ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, log=self._log_line)
    self.data_iter = vdata.train_iterator(
        self.train_cache, run.data.seq_len, t.batch_size, seed=t.seed,
        num_workers=run.data.num_workers)
    with jax.set_mesh(self.mesh):
      found = None
      if t.resume or require_resume:
        found = self.ckpt.restore_newest(self.abstract, self.data_iter, self._log_line)
      if require_resume and found is None:
        raise RunError(f"--resume: no checkpoint in {workdir}/checkpoints")
      if found is not None:
        self.state, start, kind = found
        self._log_line(f"resumed from step {start}" + (
            "" if kind == "latest" else " (the best checkpoint: no intact latest one; "
            "the data order starts over)"))
      else:
        self.state = steps.init(jax.random.key(t.seed))
    self._save_run_files()

  # -- setup ---------------------------------------------------------------------------
  def _prepare_data(self):
    """Process 0 trains the tokenizer and builds the caches; the others then load them."""
    if jax.process_count() == 1:
      return self._prepare_data_here()
    from jax.experimental import multihost_utils
    if not self.is_main:
      multihost_utils.sync_global_devices("vesperjax: data prepared")
    self._prepare_data_here()
    if self.is_main:
      multihost_utils.sync_global_devices("vesperjax: data prepared")

  def _prepare_data_here(self):
    d = self.run.data
    cache_dir = d.cache_dir or os.path.join(self.workdir, "data")
    tokenizer = d.tokenizer
    saved = os.path.join(self.workdir, "tokenizer.json")
    if os.path.exists(saved):  # a resumed run keeps its tokenizer: its spec must match
      config_path = os.path.join(self.workdir, "config.json")
      before = (read_json(config_path).get("data", {}).get("tokenizer")
                if os.path.exists(config_path) else None)
      if before is not None and before != d.tokenizer:
        raise RunError(f"{self.workdir} was trained with data.tokenizer={before!r}, not "
                       f"{d.tokenizer!r}; use a new --workdir")
      tokenizer = saved
    self.train_cache, self.val_cache, self.tokenizer = vdata.prepare_train_val(
        d.dataset, tokenizer, cache_dir, val_dataset=d.val_dataset, text_field=d.text_field,
        val_percent=d.val_percent, progress=self.is_main)

  def _check_run_dir(self):
    """A workdir holds one model: resuming it with another shape is an error (how it
    runs, EXECUTION_FIELDS such as remat or scan_layers, may change)."""
    path = os.path.join(self.workdir, "model_config.json")
    if os.path.exists(path):
      saved = ModelConfig.from_dict(read_json(path))
      diff = [f"{k}: {v} -> {getattr(self.config, k)}"
              for k, v in saved.to_dict().items()
              if k not in EXECUTION_FIELDS and getattr(self.config, k) != v]
      if diff:
        raise RunError(f"{self.workdir} holds a different model ({'; '.join(diff)}); "
                       "use a new --workdir")

  def _save_run_files(self):
    if not self.is_main:
      return
    files = {"config.json": self.run.to_json_best_effort(indent=2, sort_keys=True),
             "model_config.json": self.config.to_json()}
    for name, text in files.items():
      tmp = os.path.join(self.workdir, f".{name}.tmp")
      with open(tmp, "w") as f:
        f.write(text)
      os.replace(tmp, os.path.join(self.workdir, name))
    self.tokenizer.save(os.path.join(self.workdir, "tokenizer.json"))

  # -- loop ----------------------------------------------------------------------------
  def _next_batch(self) -> jax.Array:
    host = np.stack([next(self.data_iter) for _ in range(self.run.train.grad_accum)])
    return sharding.global_batch_from_host(host.astype(np.int32), self.mesh,
                                           self.batch_sharding)

  def evaluate(self) -> float | None:
    if self.val_cache is None or self.run.train.eval_batches == 0:
      return None
    with jax.set_mesh(self.mesh):
      return self._evaluate_batches(self.run.train)

  def _evaluate_batches(self, t) -> float:
    total, count = 0.0, 0.0
    for host in vdata.eval_batches(self.val_cache, t.batch_size, self.run.data.seq_len,
                                   t.eval_batches):
      batch = sharding.global_batch_from_host(host.astype(np.int32), self.mesh,
                                              self.eval_sharding)
      s, n = self.eval_step(self.state, batch)
      total, count = total + float(s), count + float(n)
    return total / count

  def train(self, stop_at: int | None = None) -> Outcome:
    """Train to train.max_steps (or to `stop_at`, checkpointing there as at a signal)."""
    t = self.run.train
    end = t.max_steps if stop_at is None else min(stop_at, t.max_steps)
    step = int(self.state.step)
    first = step + 1
    tokens_per_step = t.batch_size * t.grad_accum * self.run.data.seq_len
    flops = flops_per_token(self.config, self.run.data.seq_len)
    peak = device_peak_flops()
    writer = self._writer()
    bar = self._progress(step)
    last_loss = eval_loss = None
    stopped_by = None
    window_start, window_steps = time.perf_counter(), 0
    metrics = None
    guard = DivergenceGuard(t.max_skipped_steps, t.loss_spike_factor)
    diverged = None
    # under the ambient mesh the model pins activations and the MoE goes expert-parallel
    with _Signals() as signals, jax.set_mesh(self.mesh):
      try:
        while step < end:
          self.state, metrics = self.train_step(self.state, self._next_batch())
          guard.record(metrics["finite"])
          step += 1
          window_steps += 1
          if window_steps == 1 and step == first:  # compiling happened inside that call
            window_start, window_steps = time.perf_counter(), 0
          if bar is not None:
            bar.update(1)
          logged = step % t.log_every == 0 or step == t.max_steps
          saving = step % t.save_every == 0
          if logged:
            host = jax.device_get(metrics)  # the only sync on the training path
            elapsed = time.perf_counter() - window_start
            tps = tokens_per_step * window_steps / elapsed if window_steps else None
            last_loss = float(host["loss"])
            self._log_metrics(writer, bar, step, host, tps, flops, peak)
            window_start, window_steps = time.perf_counter(), 0
          if logged or saving:  # a save must not keep a diverging state
            diverged = guard.check(step, last_loss if logged else float(metrics["loss"]))
            if diverged:
              break
          if step % t.eval_every == 0 or step == t.max_steps:
            eval_loss = self.evaluate()
            if eval_loss is not None:
              self._log(writer, step, {"eval_loss": eval_loss,
                                       "eval_perplexity": math.exp(min(eval_loss, 50))})
              if self._finite():
                self.ckpt.save_best(step, self.state, eval_loss)
          if signals.received is not None:
            stopped_by = signal.Signals(signals.received).name
            break
          if saving and guard.streak:
            self._log_line(f"step {step}: not saved while steps are being skipped")
          elif saving:
            self._save(step)
          if step % t.eval_every == 0 or step % t.save_every == 0:
            window_start, window_steps = time.perf_counter(), 0  # count training time only
      except Exception:
        self._save_before_failing(step)
        raise
      if not diverged:  # a diverged state is not saved: the last good one stays latest
        self._save(step, force=True)
      self.ckpt.wait()
    if writer is not None:
      writer.close()
    if bar is not None:
      bar.close()
    if diverged:
      raise RunError(f"the run diverged at {diverged}; the latest checkpoint is step "
                     f"{self.ckpt.latest_step()}")
    skipped = int(self.state.skipped)
    return Outcome(step, last_loss, eval_loss, skipped, stopped_by)

  def _save_before_failing(self, step: int):
    """An error inside the loop: keep the steps since the last checkpoint if the state is
    still whole (a failure inside the step may have consumed its donated buffers)."""
    try:
      self._save(step, force=True)
      self.ckpt.wait()
      self._log_line(f"saved step {step} before failing")
    except Exception as e:  # noqa: BLE001  (the original error is what matters)
      self._log_line(f"step {step} could not be saved before failing: "
                     f"{' '.join(str(e).split())[:200]}")

  def _finite(self) -> bool:
    return bool(self.all_finite(self.state))

  def _save(self, step: int, force: bool = False):
    if self.ckpt.latest_step() == step:
      return
    if not self._finite():
      self._log_line(f"step {step}: state is not finite; checkpoint not saved")
      return
    self.ckpt.save(step, self.state, self.data_iter, force=force)

  # -- logging -------------------------------------------------------------------------
  def _writer(self):
    if not self.is_main:
      return None
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(self.workdir, "tb"))

  def _progress(self, step: int):
    if not self.is_main:
      return None
    from tqdm import tqdm
    return tqdm(total=self.run.train.max_steps, initial=step, unit="step",
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)

  def _log_metrics(self, writer, bar, step, host, tps, flops, peak):
    scalars = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
    scalars["perplexity"] = math.exp(min(scalars["loss"], 50))
    if "learning_rate" not in scalars:  # adamw: the schedule's value
      scalars["learning_rate"] = float(self.schedule(step - 1))
    if tps is not None:
      scalars["tokens_per_s"] = tps
      if peak:
        scalars["mfu"] = tps * flops / (peak * jax.device_count())
    if "expert_load" in host:  # [layers, experts]: each expert's share, layer-averaged
      load = np.asarray(host["expert_load"]).mean(0)
      scalars.update({f"expert_load/{i}": float(x) for i, x in enumerate(load)})
      scalars["expert_load/max_over_mean"] = float(load.max() * load.size)
    self._log(writer, step, scalars)
    if bar is not None:
      bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{tps or 0:,.0f}", refresh=False)

  def _log(self, writer, step: int, scalars: dict):
    if not self.is_main:
      return
    for k, v in scalars.items():
      writer.add_scalar(k, v, step)
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **scalars}) + "\n")

  def _log_line(self, text: str):
    if self.is_main:
      print(text, file=sys.stderr, flush=True)

  def close(self):
    """Close the checkpointer and release the workdir (idempotent)."""
    try:
      if getattr(self, "ckpt", None) is not None:
        self.ckpt.close()
    finally:
      if self._lock is not None:
        self._lock.release()
