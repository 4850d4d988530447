"""Builds a run: everything a command sets up before its loop, each piece written once.

The stages, and the commands that take them:

  `checked_mesh`           the mesh; the batch must split over it         train, throughput
  `model_vocab`            the vocabulary without reading data            throughput
  `prepare_data`           tokenizer + caches, process 0 first            train, optimizers
  `build_model`            ModelConfig, optimizer, jitted steps, LR       train, benchmarks
  `build_run`              all of it + workdir lock, checkpointer, data   train
                           iterator, the state (fresh or restored), run files
  `load_model`             the model's variables alone, restored into an  generate
                           abstract model (no optimizer, no steps)

Everything here takes the typed `RunConfig` (or its sections); `build_run` also takes an
experiment's ConfigDict, converted at the door (`run_config.as_run_config`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import jax

from vesperjax import data as vdata
from vesperjax import sharding
from vesperjax.checkpoint import CHECKPOINTS, Checkpointer, read_json
from vesperjax.config import EXECUTION_FIELDS, ModelConfig
from vesperjax.errors import RunError
from vesperjax.data import pipeline
from vesperjax.data.mixture import parse_mixture
from vesperjax.data.prepare import prepare_mixture
from vesperjax.run_config import DataConfig, RunConfig, as_run_config, model_config
from vesperjax.optim.field import lr_schedule
from vesperjax.training.train_step import ShardedSteps, sharded_steps
from vesperjax.training.workdir_lock import acquire_for_job, describe_holder

if TYPE_CHECKING:
  from ml_collections import ConfigDict

TOKENIZER_HASH = "tokenizer_hash.json"  # the workdir's record of its tokenizer's content


def log_line(text: str) -> None:
  """A status line on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(text, file=sys.stderr, flush=True)


def checked_mesh(run: RunConfig, batch_size: int, flag: str = "config.train.batch_size"):
  """The run's mesh (`run.mesh`); `batch_size` must split over its batch axes (`flag`
  names the setting in the error)."""
  mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh))
  shards = sharding.batch_divisor(mesh)
  if batch_size % shards:
    raise RunError(f"{flag}={batch_size} must be a multiple of the {shards} batch shards "
                   f"of the mesh {dict(mesh.shape)}")
  processes = jax.process_count()
  if shards % processes:  # each process feeds only its own devices' rows
    raise RunError(f"the mesh {dict(mesh.shape)} splits the batch into {shards} shard(s), "
                   f"which {processes} processes cannot share evenly (each reads its own "
                   f"1/{processes} of every batch): make mesh.data x mesh.fsdp x "
                   f"mesh.expert a multiple of {processes}")
  return mesh


def model_vocab(run: RunConfig) -> int:
  """The model's vocabulary without reading data: the config's, or the tokenizer spec's."""
  from vesperjax.data.tokenizer import Tokenizer, byte_tokenizer, parse_spec
  if run.model.vocab_size is not None:
    return run.model.vocab_size
  kind, n = parse_spec(run.data.tokenizer)
  if kind == "bpe":
    return vdata.padded_vocab_size(n)
  tok = byte_tokenizer() if kind == "byte" else Tokenizer.from_file(run.data.tokenizer)
  return vdata.padded_vocab_size(tok.vocab_size)


@dataclasses.dataclass
class Data:
  """The run's tokenizer and token caches; with `data.mixture`, each cache is a
  `mixture.Mixture` (the pipeline's functions take either)."""
  tokenizer: Any  # vesperjax.data.Tokenizer
  train_cache: Any  # TokenCache or Mixture
  val_cache: Any  # TokenCache, Mixture, or None when the data has no validation split

  def share_scalars(self, rows: int) -> dict[str, float]:
    """`data/share/NAME`: each mixture source's share of the tokens in the first `rows`
    windows of the global training stream ({} without a mixture)."""
    share = getattr(self.train_cache, "share_scalars", None)
    return {} if share is None else share(rows)


def prepare_data(run: RunConfig, workdir: str, *, progress: bool = True) -> Data:
  """Tokenizer and caches (in `data.cache_dir` or WORKDIR/data). With several processes,
  process 0 trains the tokenizer and builds the caches first; the others then load them.
  A workdir that holds a tokenizer.json keeps it, and refuses another tokenizer spec."""
  if jax.process_count() == 1:
    return _prepare_data_here(run.data, workdir, progress)
  from jax.experimental import multihost_utils
  main = jax.process_index() == 0
  if not main:
    multihost_utils.sync_global_devices("vesperjax: data prepared")
  data = _prepare_data_here(run.data, workdir, progress and main)
  if main:
    multihost_utils.sync_global_devices("vesperjax: data prepared")
  return data


def _prepare_data_here(d: DataConfig, workdir: str, progress: bool) -> Data:
  tokenizer = d.tokenizer
  saved = os.path.join(workdir, "tokenizer.json")
  kept = os.path.exists(saved)
  if kept:  # a resumed run keeps its tokenizer: its spec must match
    config_path = os.path.join(workdir, "config.json")
    before = (read_json(config_path).get("data", {}).get("tokenizer")
              if os.path.exists(config_path) else None)
    if before is not None and before != d.tokenizer:
      raise RunError(f"{workdir} was trained with data.tokenizer={before!r}, not "
                     f"{d.tokenizer!r}; use a new --workdir")
    # and its content too, before any cache is tokenized with a changed one
    check_same_tokenizer(workdir, vdata.Tokenizer.from_file(saved), saved)
    tokenizer = saved
  cache_dir = d.cache_dir or os.path.join(workdir, "data")
  kw = dict(val_dataset=d.val_dataset, text_field=d.text_field, val_percent=d.val_percent,
            progress=progress)
  if d.mixture is not None:
    train_cache, val_cache, tok = prepare_mixture(parse_mixture(d.mixture), tokenizer,
                                                  cache_dir, **kw)
  else:
    train_cache, val_cache, tok = vdata.prepare_train_val(d.dataset, tokenizer, cache_dir,
                                                          **kw)
  if not kept:  # a record without tokenizer.json (deleted): the spec's must match it
    check_same_tokenizer(workdir, tok, f"the tokenizer of data.tokenizer={tokenizer!r}")
  return Data(tok, train_cache, val_cache)


def check_same_tokenizer(workdir: str, tokenizer, what: str) -> None:
  """A workdir's checkpoints mean the ids of the tokenizer it started with: `tokenizer`
  (`what`, for the message) must have the content hash recorded in TOKENIZER_HASH then
  (vocabulary, merges, added tokens: `Tokenizer.content_hash`). A workdir without the
  record (from before it was kept) gets one when this run writes its files."""
  record = os.path.join(workdir, TOKENIZER_HASH)
  if not os.path.exists(record):
    return
  want, got = read_json(record).get("content_hash"), tokenizer.content_hash
  if want != got:
    raise RunError(f"{what}: content hash {got} differs from {want}, recorded in {record} "
                   "when this workdir's run began (its vocabulary, merges or added tokens "
                   "changed); restore the tokenizer it was trained with or use a new "
                   "--workdir")


@dataclasses.dataclass
class Model:
  """A model and its compiled steps on one mesh (no data, no state yet)."""
  mesh: Any
  config: ModelConfig
  steps: ShardedSteps  # graphdef, abstract state, shardings, init/train/eval steps
  lr: Callable[[int], Any]  # the optimizer's schedule (logged for AdamW)


def build_model(run: RunConfig, mesh, *, vocab_size: int, valid_vocab: int | None = None,
                seq_len: int | None = None, seq_flag: str = "config.data.seq_len",
                eod_id: int = -1) -> Model:
  """The ModelConfig (`run.model` over its preset, `vocab_size` unless set) and the
  optimizer and jitted steps of `run.optim` / `run.train` on `mesh`. `valid_vocab`: the
  tokenizer's size (default the model's; logits beyond it are masked); `eod_id`: its
  end-of-document id (the metacognition head's "end" target; < 0: none)."""
  config = model_config(run, vocab_size)
  seq_len = run.data.seq_len if seq_len is None else seq_len
  if seq_len > config.max_seq_len:
    raise RunError(f"{seq_flag}={seq_len} exceeds the model's max_seq_len="
                   f"{config.max_seq_len}")
  valid_vocab = config.vocab_size if valid_vocab is None else valid_vocab
  steps = sharded_steps(config, mesh, optim=run.optim, max_steps=run.train.max_steps,
                        valid_vocab=valid_vocab, fused_loss=run.train.fused_loss,
                        platform=run.train.platform, eod_id=eod_id)
  return Model(mesh, config, steps, lr_schedule(run.optim, run.train.max_steps))


def check_same_model(workdir: str, config: ModelConfig) -> None:
  """A workdir holds one model: resuming it with another shape is an error (how it
  runs, EXECUTION_FIELDS such as remat or scan_layers, may change)."""
  path = os.path.join(workdir, "model_config.json")
  if os.path.exists(path):
    saved = ModelConfig.from_dict(read_json(path))
    diff = [f"{k}: {v} -> {getattr(config, k)}" for k, v in saved.to_dict().items()
            if k not in EXECUTION_FIELDS and getattr(config, k) != v]
    if diff:
      raise RunError(f"{workdir} holds a different model ({'; '.join(diff)}); "
                     "use a new --workdir")


def write_run_files(workdir: str, run: RunConfig, config: ModelConfig, tokenizer) -> None:
  """config.json, model_config.json, tokenizer.json and its content hash
  (TOKENIZER_HASH), each replaced atomically."""
  if jax.process_index() != 0:
    return
  files = {"config.json": json.dumps(run.to_dict(), indent=2, sort_keys=True),
           "model_config.json": config.to_json()}
  for name, text in files.items():
    _replace(workdir, name, text)
  tokenizer.save(os.path.join(workdir, "tokenizer.json"))
  # after tokenizer.json: a crash between the two leaves no record, never a wrong one
  _replace(workdir, TOKENIZER_HASH, json.dumps(
      {"content_hash": tokenizer.content_hash, "vocab_size": tokenizer.vocab_size}))


def _replace(workdir: str, name: str, text: str) -> None:
  tmp = os.path.join(workdir, f".{name}.tmp")
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, os.path.join(workdir, name))


def restore_or_init(model: Model, ckpt: Checkpointer, data_iter, *, seed: int,
                    resume: bool, require_resume: bool, workdir: str,
                    log: Callable[[str], None], init_from: str | None = None,
                    tokenizer=None):
  """The newest readable checkpoint's state (moving `data_iter` to where it was), or a
  fresh one from `seed` (with `init_from`, the model of that export and an optimizer
  state fresh for it: `init_from_export`); `require_resume` makes a missing checkpoint
  an error."""
  with jax.set_mesh(model.mesh):
    found, elsewhere = None, False
    if resume or require_resume:
      # grain reads only this process's own file, which a checkpoint written by another
      # process count lacks: such a checkpoint's position is read here instead
      newest = ckpt.latest_step()
      elsewhere = newest is not None and pipeline.saved_by_other_process_count(
          _data_folder(workdir, newest))
      found = ckpt.restore_newest(model.steps.abstract, None if elsewhere else data_iter,
                                  log)
    if require_resume and found is None:
      raise RunError(f"--resume: no checkpoint in {workdir}/{CHECKPOINTS}")
    if found is None and init_from is not None:
      return init_from_export(model, seed, init_from, tokenizer, log)
    if found is None:
      return model.steps.init(jax.random.key(seed))
    state, start, kind = found
    log(f"resumed from step {start}" + (
        "" if kind == "latest" else " (the best checkpoint: no intact latest one; "
        "the data order starts over)"))
    if elsewhere and kind == "latest":
      note = pipeline.restore_global_position(_data_folder(workdir, start), data_iter)
      if note:
        log(note)
    return state


def init_from_export(model: Model, seed: int, directory: str, tokenizer, log):
  """A fresh state from `seed` holding the model variables of the export in `directory`
  (`train.init_from`, checked against the run's model and `tokenizer` first:
  `pretrained.load_for_init`) and the optimizer state `tx.init` gives them (some
  optimizers keep a copy of the params)."""
  from flax import nnx

  from vesperjax.inference.pretrained import load_for_init, read_config
  from vesperjax.kernels import platform as platforms
  exported = load_for_init(directory, model.config, tokenizer, model.mesh)
  values = dict(nnx.to_flat_state(nnx.state(exported)))
  state = model.steps.init(jax.random.key(seed))  # the step, RNG and placements

  def take(part):  # each value placed as the fresh state's
    return nnx.from_flat_state([
        (path, var.replace(jax.device_put(values[path][...], var[...].sharding)))
        for path, var in nnx.to_flat_state(part)])
  params, rest = take(state.params), take(state.rest)
  opt_init = jax.jit(platforms.traced_for(model.steps.platform, model.steps.tx.init),
                     out_shardings=model.steps.state_sharding.opt_state)
  source = read_config(directory)["source"]
  log(f"initialised from {directory} (step {source['step']} of its run); fresh "
      "optimizer state")
  return state.replace(params=params, rest=rest, opt_state=opt_init(params))


def _data_folder(workdir: str, step: int) -> str:
  return os.path.join(workdir, CHECKPOINTS, str(step), "data")


@dataclasses.dataclass
class Run:
  """A training run ready for its loop; `close()` releases the checkpointer and lock."""
  run: RunConfig
  workdir: str
  model: Model
  data: Data
  ckpt: Checkpointer
  data_iter: Any  # grain iterator of host batches, checkpointed with the state
  state: Any  # TrainState
  lock: Any  # WorkdirLock on process 0, None elsewhere

  def close(self) -> None:
    _close(self.ckpt, self.lock)


def _close(ckpt, lock) -> None:
  try:
    if ckpt is not None:
      ckpt.close()
  finally:
    if lock is not None:
      lock.release()


def build_run(run: RunConfig | ConfigDict, workdir: str, *, require_resume: bool = False,
              log: Callable[[str], None] = log_line) -> Run:
  """Everything a training run needs, in the order that fails cheapest first: the mesh
  and the model config before the workdir is touched; the workdir lock before anything
  in it is read or written; the data before the model (the tokenizer sets the vocab).
  `run`: a RunConfig, or an experiment's ConfigDict (converted and validated here)."""
  run = as_run_config(run)
  t = run.train
  mesh = checked_mesh(run, t.batch_size)
  model_config(run)  # a bad model config fails before tokenizing
  os.makedirs(workdir, exist_ok=True)
  lock = acquire_for_job(workdir)
  if lock is not None and lock.previous:
    log(f"{workdir}: took over the lock of a trainer that is gone "
        f"({describe_holder(lock.previous)})")
  ckpt = None
  try:
    data = prepare_data(run, workdir, progress=jax.process_index() == 0)
    vocab = data.tokenizer.vocab_size
    model = build_model(run, mesh, vocab_size=vdata.padded_vocab_size(vocab),
                        valid_vocab=vocab, eod_id=data.tokenizer.eod_id)
    check_same_model(workdir, model.config)  # before anything compiles or is written
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, log=log)
    data_iter = vdata.train_iterator(data.train_cache, run.data.seq_len, t.batch_size,
                                     seed=t.seed, num_workers=run.data.num_workers)
    state = restore_or_init(model, ckpt, data_iter, seed=t.seed,
                            resume=t.resume, require_resume=require_resume,
                            workdir=workdir, log=log, init_from=t.init_from,
                            tokenizer=data.tokenizer)
    write_run_files(workdir, run, model.config, data.tokenizer)
  except BaseException:
    _close(ckpt, lock)
    raise
  return Run(run, workdir, model, data, ckpt, data_iter, state, lock)
