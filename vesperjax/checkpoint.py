"""Orbax checkpoints of a run: the train state plus the data iterator.

(`inference.loading.load_model` reads a model's weights back for inference.)

WORKDIR/checkpoints/<step>/  latest N: {state, data}  (periodic, final, emergency)
WORKDIR/best/<step>/         lowest eval loss: {state}
WORKDIR/corrupt/             checkpoints set aside because they could not be read
Orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint that restore would pick up.
Files damaged later (truncated, garbled) are found at restore: `restore_newest` falls back
to the newest checkpoint that reads, latest first, then best, and sets the unreadable
newer ones aside (never deletes them). A save that fails (a full disk) removes its
temporary directory and raises `CheckpointSaveError`: the checkpoints before it stay whole.
Readers of a run still training (`read_model_checkpoint`: export, generate) take the
newest complete checkpoint, and the then-newest once more when the trainer rotates the
first out while it is being read.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from vesperjax.errors import CheckpointError, CheckpointSaveError, one_line

CHECKPOINTS, BEST, CORRUPT = "checkpoints", "best", "corrupt"
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


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

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True,
               log: Callable[[str], None] = print):
    self.latest = _manager(os.path.join(workdir, CHECKPOINTS), keep, async_save)
    best_dir = os.path.join(workdir, BEST)
    for step in _step_dirs(best_dir):  # orbax reads every best step's metrics on start
      try:
        _check_json(os.path.join(best_dir, step))
      except CheckpointError as e:
        log(f"best checkpoint {step} is unreadable ({e}); moved to "
            f"{_set_aside(best_dir, step)}")
    self.best = _manager(best_dir, 1, async_save, best=True)
    self.best_loss = float("inf")
    self._failed = False

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    with self._writing(step):
      return self.latest.save(step, args=ocp.args.Composite(**args), force=force)

  def save_best(self, step: int, state, eval_loss: float) -> bool:
    """Keep `state` if `eval_loss` beats every earlier evaluation of this run."""
    if not eval_loss < self.best_loss:
      return False
    self.best_loss = eval_loss
    with self._writing(step):
      return self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                            metrics={"eval_loss": eval_loss}, force=True)

  @contextlib.contextmanager
  def _writing(self, step: int | None):
    """Turn a failed save into one CheckpointSaveError and remove what it left behind.

    An async save fails in orbax's background thread and surfaces at the next save or
    wait, so the step named is the one in the failing path when orbax gives it.
    """
    try:
      yield
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise bare Exception)
      text = one_line(e)
      found = re.search(r"/(\d+)" + re.escape(_TMP_SUFFIX), text)
      failed = found.group(1) if found else step
      for manager in (self.latest, self.best):  # writer threads still running would
        try:                                    # recreate what is removed below
          manager.wait_until_finished()
        except Exception:  # noqa: BLE001  (the same failure, reported once above)
          pass
      removed = self._remove_partial_saves()
      if "No space left on device" in text:
        text = f"no space left on device ({self.latest.directory})"
      latest = self.latest_step()
      self._failed = True
      raise CheckpointSaveError(
          f"checkpoint {failed} could not be saved: {text[:300]}; "
          + (f"the latest checkpoint is step {latest}" if latest is not None
             else "no checkpoint was saved")
          + ("; its partial files were removed" if removed else "")) from None

  def restore(self, step: int, abstract_state, data_iter=None):
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.latest.restore(step, args=ocp.args.Composite(**args))
    self._read_best_loss()
    return restored["state"]

  def _read_best_loss(self):
    """A resumed run must not replace a better earlier best (unreadable: forgotten)."""
    best = self.best.best_step()
    if best is None:
      return
    try:
      self.best_loss = float(self.best.metrics(best)["eval_loss"])
    except Exception:  # noqa: BLE001  (garbled metrics: the next eval sets a new best)
      self.best_loss = float("inf")

  def restore_newest(self, abstract_state, data_iter, log: Callable[[str], None]):
    """(state, step, kind) from the newest checkpoint that reads, or None when there is
    none at all; kind is "latest" or "best" (then the data iterator starts over).

    Unreadable checkpoints newer than the one restored are moved to WORKDIR/corrupt and
    reported through `log`; when nothing reads, nothing is moved and a one-line
    CheckpointError names the newest failure (a config that no longer matches its
    checkpoints fails every restore the same way, and must not look like corruption).
    """
    failed = []  # (manager, step, reason)
    for manager, kind in ((self.latest, "latest"), (self.best, "best")):
      for step in sorted(manager.all_steps(), reverse=True):
        try:
          _check_json(os.path.join(str(manager.directory), str(step)))
          if kind == "latest":
            state = self.restore(step, abstract_state, data_iter)
          else:
            state = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
            self._read_best_loss()
        except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise bare Exception)
          failed.append((manager, step, one_line(e)))
          continue
        for bad_manager, bad_step, reason in failed:
          where = _set_aside(str(bad_manager.directory), str(bad_step))
          bad_manager.reload()
          log(f"checkpoint {bad_step} in {bad_manager.directory} is unreadable ({reason}); "
              f"moved to {where}")
        return state, step, kind
    if failed:
      _, step, reason = failed[0]
      raise CheckpointError(f"no readable checkpoint: step {step} (the newest) failed: "
                            f"{reason}")
    return None

  def wait(self):
    with self._writing(None):
      self.latest.wait_until_finished()
      self.best.wait_until_finished()

  def _remove_partial_saves(self) -> list[str]:
    """Delete the temporary directories of unfinished saves (on process 0)."""
    removed = []
    for manager in (self.latest, self.best):
      root = str(manager.directory)
      for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(_TMP_SUFFIX):
          removed.append(os.path.join(os.path.basename(root), name))
          if jax.process_index() == 0:  # no barrier: the others may not have failed
            path = os.path.join(root, name)
            for _ in range(3):  # a late write can refill a folder rmtree just emptied
              shutil.rmtree(path, ignore_errors=True)
              if not os.path.exists(path):
                break
              time.sleep(0.1)
    return removed

  def close(self):
    try:
      self.latest.close()
      self.best.close()
    except Exception:  # noqa: BLE001
      if not self._failed:  # else: the failed save, already raised once
        raise


def _step_dirs(root: str) -> list[str]:
  return sorted(d for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _check_json(step_dir: str) -> None:
  """Name the file when a checkpoint's JSON metadata is garbled (orbax does not)."""
  for folder, _, files in os.walk(step_dir):
    for name in files:
      if name in _JSON_FILES or name.endswith(".json") or name == "metrics":
        path = os.path.join(folder, name)
        try:
          with open(path) as f:
            json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
          raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _set_aside(root: str, step: str) -> str:
  """Move ROOT/STEP to WORKDIR/corrupt/<root name>-<step>-<time> (process 0; all wait)."""
  src = os.path.join(root, step)
  dest = os.path.join(os.path.dirname(root), CORRUPT,
                      f"{os.path.basename(root)}-{step}-{int(time.time())}")
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(src, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"vesperjax: set aside {src}")
  return dest


def _choose(manager, workdir: str, step: int | None, best: bool) -> int:
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no {'best ' if best else ''}checkpoint in {workdir}")
  if step is None:
    return manager.best_step() if best else manager.latest_step()
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {workdir}; have "
                          f"{sorted(steps)}")
  return step


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{path} not found: is this a vesperjax run directory?") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e.msg})") from None


def read_model_checkpoint(workdir: str, target: dict, *, step: int | None = None,
                          best: bool = False,
                          log: Callable[[str], None] = lambda line: None) -> tuple[int, dict]:
  """(step, the model's variables) from a run's checkpoint: the subtrees of the saved
  train state named in `target` (e.g. {"params": ..., "rest": ...} of abstract arrays
  with their shardings; Orbax reshards), never the optimizer state.

  `step=None`: the newest checkpoint complete when called (the best one with
  `best=True`). A trainer still running in `workdir` keeps only its newest few and may
  remove that one while it is read; then the newest one at that moment is read instead,
  once, said through `log`. Any other failure is a one-line CheckpointError naming the
  step: one asked for and removed, or one that is still there and does not read
  (damaged, or saved from another model).
  """
  manager = _manager(os.path.join(workdir, BEST if best else CHECKPOINTS), 1, False,
                     best=best)
  args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  try:
    chosen = _choose(manager, workdir, step, best)
    try:
      return chosen, manager.restore(chosen, args=args)["state"]
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise bare Exception)
      manager.reload()
      steps = manager.all_steps()
      newest = (manager.best_step() if best else manager.latest_step()) if steps else None
      # gone, or a newer one saved (the trainer deletes the oldest after that): the
      # failure was the rotation, and says nothing about the checkpoint itself
      rotated = chosen not in steps or (step is None and newest != chosen)
      if not rotated:
        raise CheckpointError(f"cannot read checkpoint {chosen} of {workdir}: "
                              f"{one_line(e)}") from None
      if step is not None or newest is None:
        raise CheckpointError(
            f"checkpoint {chosen} of {workdir} was removed while being read (a running "
            f"trainer keeps only its newest); have {sorted(steps)}") from None
    log(f"checkpoint {chosen} of {workdir} was rotated out while being read (a running "
        f"trainer keeps only its newest); reading {newest} instead")
    try:
      return newest, manager.restore(newest, args=args)["state"]
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(
          f"cannot read checkpoint {newest} of {workdir} either (read after {chosen} was "
          f"rotated out while being read; try again): {one_line(e)}") from None
  finally:
    manager.close()
