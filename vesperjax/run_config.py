"""The run configuration schema (an ml_collections ConfigDict) shared by every experiment.

`experiments/<preset>.py` files start from `default_run_config(preset)` and change what
they need; the CLI applies `--config.key=value` overrides on top. Model fields left as
None come from the preset; `model.vocab_size=None` follows the tokenizer (padded to 128).
"""
from __future__ import annotations

import math
import types
import typing

from ml_collections import ConfigDict, config_dict

from vesperjax.config import ModelConfig, model_preset

def _field_type(annotation) -> type:
  """The value type of a ModelConfig field (`float | None` -> float)."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
  if annotation not in (int, float, bool, str):
    raise TypeError(f"ModelConfig field type {annotation!r} has no config key type")
  return annotation


_MODEL_TYPES = {name: _field_type(t) for name, t in typing.get_type_hints(ModelConfig).items()}


def default_run_config(preset: str = "tiny") -> ConfigDict:
  c = ConfigDict()
  c.model = ConfigDict({"preset": preset})
  for name, kind in _MODEL_TYPES.items():
    c.model[name] = config_dict.placeholder(kind)

  c.data = ConfigDict(dict(
      dataset="stdlib",  # a .txt/.jsonl/.json file, a folder, or "stdlib"
      val_dataset=config_dict.placeholder(str),  # default: the dataset's held-out split
      tokenizer="bpe:8192",  # a tokenizer.json path, "bpe:N" or "byte"
      seq_len=256,
      text_field="text",
      val_percent=5.0,
      cache_dir=config_dict.placeholder(str),  # default: WORKDIR/data
      num_workers=0,  # grain worker processes (0: read in the training process)
  ))
  c.optim = ConfigDict(dict(
      name="velvet",  # "velvet" or "adamw"
      lr=5e-4,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=1e-3,
      max_grad_norm=1.0,
      warmup_steps=100,
      min_lr_ratio=0.1,  # cosine decays to lr * min_lr_ratio at max_steps
      entropy_adaptive=True,
      perplexity_guided=True,
      sparse_aware=True,
      fused=False,  # Velvet's Pallas kernel (GPU; interpret mode elsewhere)
  ))
  c.train = ConfigDict(dict(
      batch_size=8,  # global sequences per micro-step
      grad_accum=1,  # micro-steps per optimizer step
      max_steps=1000,
      eval_every=200,
      eval_batches=8,
      save_every=500,
      keep_checkpoints=3,
      log_every=10,
      seed=0,
      # the backend the steps are built for: auto (the mesh's devices, or the
      # VESPERJAX_PLATFORM environment variable), cpu, cuda, rocm or tpu
      platform="auto",
      fused_loss=True,  # chunked linear cross-entropy (never materialises fp32 logits)
      resume=True,  # continue from WORKDIR's latest checkpoint when there is one
      # divergence stops the run (non-zero exit, the last good checkpoint kept as latest):
      max_skipped_steps=5,  # this many consecutive non-finite steps (0: never)
      loss_spike_factor=3.0,  # a logged loss over this x the median of the last 10 (0: never)
      sample_tokens=64,  # tokens sampled at the end of training (0: none)
      sample_prompt="def ",
  ))
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.lock()
  return c


def model_config(run: ConfigDict, vocab_size: int | None = None) -> ModelConfig:
  """The ModelConfig a run trains: the preset with the non-None `model.*` keys over it.

  How the model runs (`model.dtype`, `model.remat`, `model.scan_layers`, ...) is part of
  the ModelConfig too; a run may resume with other values of those (EXECUTION_FIELDS).
  """
  overrides = {k: v for k, v in run.model.items() if k != "preset" and v is not None}
  if vocab_size is not None:
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
      raise ValueError(f"model.vocab_size={overrides['vocab_size']} is smaller than the "
                       f"tokenizer's {vocab_size} tokens")
    overrides.setdefault("vocab_size", vocab_size)
  return model_preset(run.model.preset, **overrides)


def validate(run: ConfigDict) -> None:
  """One-line ValueErrors for values no run can use (types are checked by ConfigDict)."""
  def need(ok, key, why):
    if not ok:
      raise ValueError(f"config.{key}: {why}")

  t, d, o = run.train, run.data, run.optim
  need(o.name in ("velvet", "adamw"), "optim.name", f"{o.name!r} is not velvet or adamw")
  for key in ("lr", "b1", "b2", "eps", "weight_decay", "max_grad_norm", "min_lr_ratio"):
    need(math.isfinite(o[key]), f"optim.{key}", f"must be finite, got {o[key]}")
  for key, value in run.model.items():
    if isinstance(value, float):
      need(math.isfinite(value), f"model.{key}", f"must be finite, got {value}")
  need(o.lr > 0, "optim.lr", "must be positive")
  need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
  need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every",
              "keep_checkpoints", "log_every"):
    need(t[key] > 0, f"train.{key}", "must be positive")
  need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
  need(t.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0 (0: never stop)")
  need(math.isfinite(t.loss_spike_factor) and (t.loss_spike_factor == 0
                                               or t.loss_spike_factor > 1),
       "train.loss_spike_factor", "must be 0 (off) or a finite number > 1")
  need(d.seq_len > 1, "data.seq_len", "must be > 1")
  need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
  if t.platform != "auto":
    from vesperjax.kernels import platform  # pylint: disable=g-import-not-at-top
    try:
      platform.normalize(t.platform)
    except ValueError as e:
      raise ValueError(f"config.train.platform: {e}") from None
