"""`python -m vesperjax.train --config experiments/tiny.py [--config.train.max_steps=300]`.

Trains, evaluates and checkpoints into --workdir (default runs/<config name>), resuming
from its latest checkpoint when there is one. Bad input ends with one `error:` line and
exit status 2; SIGTERM/SIGINT save a checkpoint and exit with 128 + the signal number.
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from vesperjax.cli import load_run_config, run_cli, use_compilation_cache, warn

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config name>).")
_RESUME = flags.DEFINE_bool("resume", False,
                            "Require a checkpoint in --workdir to resume from.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)


def train(run, workdir: str, require_resume: bool = False) -> int:
  """Train one run to completion (or to a signal); returns the process exit status.

  `run`: a `RunConfig`, or an experiment's ConfigDict (converted and validated on entry).
  """
  import jax

  from vesperjax import distributed
  from vesperjax.optim.field import adjusted_values
  from vesperjax.run_config import as_run_config
  from vesperjax.training.trainer import Trainer, exit_status

  run = as_run_config(run)
  distributed.maybe_initialize_distributed()
  for line in adjusted_values(run.optim, run.train.max_steps):
    warn(line)
  trainer = Trainer(run, workdir, require_resume=require_resume)
  try:
    out = trainer.train()
  finally:
    trainer.close()
  if jax.process_index() == 0:
    _summary(trainer, out)
  return exit_status(out.stopped_by, diverged=None)  # a divergence raised RunError


def _summary(trainer, out) -> None:
  import math
  loss = "n/a" if out.last_loss is None else f"{out.last_loss:.4f}"
  ev = "n/a" if out.eval_loss is None else (
      f"{out.eval_loss:.4f} (perplexity {math.exp(min(out.eval_loss, 50)):.1f})")
  how = f"stopped by {out.stopped_by}" if out.stopped_by else "done"
  print(f"{how}: step {out.step}, train loss {loss}, eval loss {ev}, "
        f"skipped steps {out.skipped}, checkpoints in {trainer.workdir}/checkpoints")
  n = trainer.run.train.sample_tokens
  if n and not out.stopped_by:
    print(f"sample: {_sample(trainer, n)!r}")


def _sample(trainer, n: int) -> str:
  from flax import nnx

  from vesperjax.inference.sampling import generate
  tok = trainer.built.data.tokenizer
  model = nnx.merge(trainer.built.model.steps.graphdef, trainer.state.params, trainer.state.rest)
  prompt = tok.encode(trainer.run.train.sample_prompt) or [tok.eod_id]
  ids = generate(model, [prompt], max_new_tokens=n, temperature=0.8, top_k=40,
                 seed=trainer.run.train.seed, eos_id=tok.eod_id)
  return tok.decode(prompt + [int(i) for i in ids[0]], skip_special_tokens=True)


def main(argv=None) -> int:
  def body():
    run = load_run_config(_CONFIG)
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    name = os.path.splitext(os.path.basename(config_file))[0]
    workdir = _WORKDIR.value or os.path.join("runs", name)
    use_compilation_cache()
    return train(run, workdir, require_resume=_RESUME.value)

  return run_cli(sys.argv if argv is None else argv, body)


if __name__ == "__main__":
  sys.exit(main())
