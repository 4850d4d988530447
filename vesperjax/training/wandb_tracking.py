"""Weights & Biases tracking of a training run: `train.wandb=True` (the `[wandb]` extra).

The run logs the same scalars at the same steps as TensorBoard and metrics.jsonl (the
trainer hands a `WandbRun` to `actions.MetricsSink`, which writes every sink), plus the
run config, the resolved model config and the parameter counts as the W&B config. Only
process 0 talks to W&B.

  `require_wandb`   before anything is built: the package is installed and, unless W&B
                    is offline or disabled, an API key is configured
  `WandbRun.start`  `wandb.init`, resuming the W&B run whose id WORKDIR/wandb_run_id holds
                    when the training run resumes from a checkpoint
  `WandbRun.log`    one step's scalars
  `WandbRun.finish` with the process's exit status (0, 2 for a diverged run, 128 + the
                    signal number for a signal's stop)

The mode is W&B's own: `WANDB_MODE=offline` (write locally, `wandb sync` later),
`WANDB_MODE=disabled`, or `wandb offline` / `wandb online`. W&B writes its files into
`$WANDB_DIR/wandb/` when set, else WORKDIR/wandb/.
"""
from __future__ import annotations

import os
import secrets
import string
from typing import Any

from vesperjax.training.build import RunError, log_line

RUN_ID_FILE = "wandb_run_id"  # in WORKDIR: the W&B run a resumed training run continues
_LOCAL_MODES = ("offline", "dryrun", "disabled")  # modes that need no API key
_ID_ALPHABET = string.ascii_lowercase + string.digits  # what W&B's own ids are made of


def _import_wandb():
  try:
    import wandb
  except ImportError:
    raise RunError("train.wandb=True needs the wandb package: "
                   "pip install 'vesperjax[wandb]'") from None
  return wandb


def _one_line(e: BaseException) -> str:
  return " ".join((str(e).strip() or type(e).__name__).split())


def parse_tags(tags: str) -> list[str]:
  """`train.wandb_tags` ("a,b, c") as W&B tags; empty items are dropped."""
  return [t.strip() for t in tags.split(",") if t.strip()]


def wandb_mode() -> str:
  """The mode `wandb.init` will run in: WANDB_MODE, else the settings that `wandb
  offline` / `wandb online` write, else online."""
  from wandb.sdk import wandb_setup  # the global settings wandb.login and wandb.init read
  return wandb_setup.singleton().settings.mode


def require_wandb() -> None:
  """A RunError (one line) unless W&B can log this run: the package imports and, in
  online mode, an API key is configured (WANDB_API_KEY, ~/.netrc from `wandb login`, or
  W&B's settings). `wandb.login(verify=False, prompt=False)` reads them without asking
  the server whether the key is valid (that is `wandb.init`'s first request); a key of
  the wrong form is refused here."""
  wandb = _import_wandb()
  if wandb_mode() in _LOCAL_MODES:
    return
  try:
    logged_in = wandb.login(verify=False, prompt=False)
  except wandb.errors.Error as e:  # e.g. an API key of the wrong format
    raise RunError(f"train.wandb=True: {_one_line(e)}") from None
  if not logged_in:
    raise RunError("train.wandb=True: no W&B API key; run `wandb login` or set "
                   "WANDB_API_KEY (or WANDB_MODE=offline to log locally, synced later "
                   "with `wandb sync`)")


def _read_run_id(path: str) -> str | None:
  try:
    with open(path) as f:
      run_id = f.read().strip()
  except FileNotFoundError:
    return None
  return run_id or None


def _write_run_id(path: str, run_id: str) -> None:
  tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
  with open(tmp, "w") as f:
    f.write(run_id + "\n")
  os.replace(tmp, path)


class WandbRun:
  """One W&B run, logged by process 0 while a training run trains."""

  def __init__(self, run: Any, first_step: int):
    self.run = run
    # a resumed W&B run may hold steps past the checkpoint (logged before a crash): the
    # exact resume recomputes the same values, and W&B refuses a step below its own
    self.first_step = first_step

  @classmethod
  def start(cls, workdir: str, *, project: str, entity: str | None, name: str | None,
            tags: str, config: dict[str, Any], resumed: bool) -> "WandbRun":
    """`wandb.init` for the training run in `workdir`: a new W&B run, or (`resumed`:
    the training run restored a checkpoint) the one WORKDIR/wandb_run_id names.
    `name` defaults to the workdir's base name; `tags` is `train.wandb_tags`."""
    wandb = _import_wandb()
    id_path = os.path.join(workdir, RUN_ID_FILE)
    run_id = _read_run_id(id_path) if resumed else None
    if run_id is None:  # a run from step 0 is a new W&B run
      run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
      _write_run_id(id_path, run_id)
    try:
      run = wandb.init(project=project, entity=entity,
                       name=name or os.path.basename(os.path.abspath(workdir)),
                       tags=parse_tags(tags), id=run_id, resume="allow",
                       dir=os.environ.get("WANDB_DIR") or workdir)
      # a resumed run may have changed keys (max_steps raised): they replace the old
      run.config.update(config, allow_val_change=True)
    except wandb.errors.Error as e:  # unknown entity, no connection, ...
      raise RunError(f"train.wandb=True: wandb.init failed: {_one_line(e)}") from None
    return cls(run, first_step=run.step)

  def log(self, step: int, scalars: dict[str, float]) -> None:
    """Scalars at `step` (several calls at one step make one W&B row)."""
    if step >= self.first_step:
      self.run.log(scalars, step=step)

  def finish(self, exit_code: int) -> None:
    """Ends the W&B run, marked failed when `exit_code` is not 0; idempotent. A failure
    here is reported in one line, not raised: the training run itself is saved."""
    run, self.run = self.run, None
    if run is None:
      return
    try:
      run.finish(exit_code=exit_code)
    except Exception as e:  # noqa: BLE001  (an upload error must not fail a finished run)
      log_line(f"wandb: the run did not finish cleanly: {_one_line(e)[:200]}")
