"""The train and eval steps of a run built on any devices (real, or compile-only GPU and
TPU targets) with abstract inputs: what the deviceless compile tests lower."""
import dataclasses

import jax
import jax.numpy as jnp

from vesperjax import sharding
from vesperjax.run_config import RunConfig, default_run_config, model_config
from vesperjax.training.train_step import sharded_steps

VOCAB = 2048  # padded; the last 48 ids are padding, as a BPE vocabulary's would be


def abstract_steps(run, devices):
  """(mesh, ShardedSteps, abstract train batch, abstract eval tokens) of `run` on
  `devices`."""
  mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh), devices=list(devices))
  t = run.train
  built = sharded_steps(model_config(run, VOCAB), mesh, optim=run.optim,
                        max_steps=t.max_steps, valid_vocab=VOCAB - 48,
                        fused_loss=t.fused_loss, platform=t.platform)
  batch = jax.ShapeDtypeStruct((t.grad_accum, t.batch_size, run.data.seq_len + 1),
                               jnp.int32, sharding=built.batch_sharding)
  tokens = jax.ShapeDtypeStruct((t.batch_size, run.data.seq_len + 1), jnp.int32,
                                sharding=built.eval_sharding)
  return mesh, built, batch, tokens


def small_run(preset="tiny", platform="cuda", *, layers=2, seq_len=128, batch=None,
              **overrides):
  """A small validated run of `preset` for `platform`; overrides as section__key=value."""
  run = default_run_config(preset)
  run.model.num_layers = layers
  run.data.seq_len = seq_len
  if batch is not None:
    run.train.batch_size = batch
  run.train.platform = platform
  for key, value in overrides.items():
    section, name = key.split("__")
    run[section][name] = value
  return RunConfig.from_config_dict(run)
