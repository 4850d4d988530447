"""A trained run's model for inference: its variables restored into an abstract model,
never the optimizer state."""
from __future__ import annotations

import os
from typing import Callable

import jax

from vesperjax import sharding
from vesperjax.checkpoint import CheckpointError, read_json, read_model_checkpoint
from vesperjax.config import ModelConfig
from vesperjax.run_config import RunConfig


def load_model(workdir: str, step: int | None = None, *, best: bool = False,
               log: Callable[[str], None] = lambda line: None):
  """(model in eval mode, tokenizer, RunConfig) of a run, on one device.

  `step=None` takes the newest checkpoint (or the best one with `best=True`), the
  then-newest when a running trainer rotates it out while it is read; `log` gets one
  line naming the step read (and the rotation, if any). Only the model's variables are
  read (the `params` and `rest` of the saved train state, restored into an abstract
  model's shapes and shardings); the optimizer state is never built.
  """
  from flax import nnx

  from vesperjax.data import Tokenizer

  # an older workdir's config.json may hold keys the schema has since dropped
  run = RunConfig.from_dict(read_json(os.path.join(workdir, "config.json")),
                            ignore_unknown=True)
  config = ModelConfig.from_dict(read_json(os.path.join(workdir, "model_config.json")))
  tok_path = os.path.join(workdir, "tokenizer.json")
  if not os.path.exists(tok_path):
    raise CheckpointError(f"{tok_path} not found: is this a vesperjax run directory?")
  tokenizer = Tokenizer.from_file(tok_path)

  one_device = sharding.make_mesh(devices=jax.devices()[:1])  # whatever it was saved on
  read, graphdef, params, rest = restore_model_variables(workdir, config, one_device,
                                                         step=step, best=best, log=log)
  kind = "best" if best else "latest" if step is None else "asked for"
  log(f"read checkpoint {read} of {workdir} ({kind})")
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return model, tokenizer, run


def restore_model_variables(workdir: str, config: ModelConfig, mesh, *,
                            step: int | None = None, best: bool = False,
                            log: Callable[[str], None] = lambda line: None):
  """(step read, graphdef, params, rest) of the model saved in `workdir`'s checkpoint
  (`step`, else the newest, or the best: `checkpoint.read_model_checkpoint`, which says
  through `log` when it reads another than it chose), placed on `mesh` by the logical
  rules (Orbax reshards); never the optimizer state."""
  from flax import nnx

  from vesperjax.model import abstract_model, trainable_filter
  graphdef, params, rest = nnx.split(abstract_model(config), trainable_filter(config), ...)
  target = {"params": restore_target(params, mesh), "rest": restore_target(rest, mesh)}
  read, saved = read_model_checkpoint(workdir, target, step=step, best=best, log=log)
  return read, graphdef, saved["params"], saved["rest"]


def restore_target(tree, mesh):
  """ShapeDtypeStructs carrying the rule-given shardings on `mesh`: Orbax reshards."""
  shardings = sharding.state_shardings(tree, mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
