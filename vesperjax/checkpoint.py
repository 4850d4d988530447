"""Orbax checkpoints of a run: the train state plus the data iterator, and model loading.

WORKDIR/checkpoints/<step>/  latest N: {state, data}  (periodic, final, emergency)
WORKDIR/best/<step>/         lowest eval loss: {state}
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint that restore would pick up.
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from vesperjax.config import ModelConfig

CHECKPOINTS, BEST = "checkpoints", "best"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used (missing, or not from this kind of run)."""


def _manager(path: str, keep: int, async_save: bool, best: bool = False):
  # The latest and best managers may save the same step at once; their multi-process
  # barriers (e.g. "async_write_complete.<step>") must not share names, or one
  # process's save fails with "Barrier ... is already ongoing" (a run that evaluated
  # and saved on the same step failed this way about 1 time in 6 with 2 processes).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      best_fn=(lambda m: m["eval_loss"]) if best else None, best_mode="min",
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=BEST if best else CHECKPOINTS))
  return ocp.CheckpointManager(os.path.abspath(path), options=options)


class Checkpointer:
  """Saves and restores one run's state; all processes call every method."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.latest = _manager(os.path.join(workdir, CHECKPOINTS), keep, async_save)
    self.best = _manager(os.path.join(workdir, BEST), 1, async_save, best=True)
    self.best_loss = float("inf")

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.latest.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state, eval_loss: float) -> bool:
    """Keep `state` if `eval_loss` beats every earlier evaluation of this run."""
    if not eval_loss < self.best_loss:
      return False
    self.best_loss = eval_loss
    return self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                          metrics={"eval_loss": eval_loss}, force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.latest.restore(step, args=ocp.args.Composite(**args))
    best = self.best.best_step()
    if best is not None:  # a resumed run must not replace a better earlier best
      self.best_loss = float(self.best.metrics(best)["eval_loss"])
    return restored["state"]

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found: is this a vesperjax run directory?") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e.msg})") from None


def load_model(workdir: str, step: int | None = None, *, best: bool = False):
  """(model in eval mode, tokenizer, run config) of a run, on the devices present.

  `step=None` takes the latest checkpoint (or the best one with `best=True`). Only the
  model variables are read; the optimizer state is restored abstractly and dropped.
  """
  from ml_collections import ConfigDict

  from vesperjax.data import Tokenizer
  from vesperjax.sharding import make_mesh
  from vesperjax.train_step import sharded_steps

  run = ConfigDict(read_json(os.path.join(workdir, "config.json")))
  config = ModelConfig.from_dict(read_json(os.path.join(workdir, "model_config.json")))
  tok_path = os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(tok_path):
    raise CheckpointError(f"{tok_path} not found: is this a vesperjax run directory?")
  tokenizer = Tokenizer.from_file(tok_path)

  manager = _manager(os.path.join(workdir, BEST if best else CHECKPOINTS), 1, False)
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {workdir}")
  if step is None:
    step = manager.best_step() if best else manager.latest_step()
  elif step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {workdir}; have {sorted(steps)}")

  one_device = make_mesh(devices=jax.devices()[:1])  # whatever mesh it was saved from
  target = sharded_steps(config, run, one_device, valid_vocab=tokenizer.vocab_size)
  state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target.abstract)))["state"]
  manager.close()
  model = nnx.merge(target.graphdef, state.params, state.rest)
  model.eval()
  return model, tokenizer, run
