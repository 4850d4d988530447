"""The run configuration: its schema as typed sections, the ConfigDict experiments edit,
and the one conversion between them.

The schema is defined once, here: one frozen dataclass per section (`ModelOverrides`,
`DataConfig`, `OptimConfig`, `TrainConfig`, `MeshConfig`), held by `RunConfig`.
`experiments/<preset>.py` files start from `default_run_config(preset)`, an
ml_collections ConfigDict generated from those dataclasses (each key typed as its field),
and change what they need; the CLI applies `--config.section.key=value` overrides on top
and turns the result into a `RunConfig` once (`RunConfig.from_config_dict`, which also
validates). Library code takes the `RunConfig` and its sections, never the ConfigDict.

Model keys left at None take the preset's value (`model.vocab_size=None` follows the
tokenizer, padded to 128). None is not a command-line value: to keep the preset's value,
leave the key out (`--config.model.moe_capacity_factor=None` is refused in one line).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from ml_collections import ConfigDict, config_dict

from vesperjax.config import ModelConfig, model_preset

# `optim.name`'s choices (built in vesperjax/optim/field.py)
OPTIMIZERS = ("velvet", "adamw", "muon", "schedule_free_adamw", "ademamix")

# ModelConfig's fields, each optional here: None takes the preset's (or the tokenizer's)
# value. Derived from ModelConfig so that a new model field is a config key at once.
ModelOverrides = dataclasses.make_dataclass(
    "ModelOverrides",
    [("preset", str, dataclasses.field(default="tiny"))]
    + [(name, hint | None, dataclasses.field(default=None))
       for name, hint in typing.get_type_hints(ModelConfig).items()],
    frozen=True)
ModelOverrides.__module__ = __name__
ModelOverrides.__doc__ = """`config.model`: a preset and any `ModelConfig` field over it.

  preset: tiny, small, medium, large, xlarge, tiny-moe, medium-moe, large-moe.
  Every other field is `ModelConfig`'s, typed as there and None by default: None takes
  the preset's value (`vocab_size`: the tokenizer's, padded to a multiple of 128).
  """


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data`: what the run trains and evaluates on, and how it is tokenized."""
  # a .txt/.jsonl/.json/.parquet/.arrow file, a folder, a glob, "stdlib", or a
  # comma-separated list of those (docs/data.md)
  dataset: str = "stdlib"
  # several datasets with weights, "NAME=PATH:WEIGHT,..." (docs/data.md); replaces dataset
  mixture: str | None = None
  val_dataset: str | None = None  # default: the dataset's held-out split
  tokenizer: str = "bpe:8192"  # a tokenizer.json path, "bpe:N" or "byte"
  seq_len: int = 256  # tokens per training sequence
  text_field: str = "text"  # the text's key in .jsonl records, or Parquet/Arrow column
  val_percent: float = 5.0  # the held-out split's share when there is no val_dataset
  cache_dir: str | None = None  # default: WORKDIR/data
  num_workers: int = 0  # grain worker processes (0: read in the training process)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim`: the optimizer and its learning-rate schedule."""
  # velvet, adamw, muon, schedule_free_adamw or ademamix (vesperjax/optim/field.py)
  name: str = "velvet"
  lr: float = 5e-4  # peak learning rate, reached after warmup_steps
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 1e-3  # decoupled, as AdamW
  max_grad_norm: float = 1.0  # gradients are clipped to this global norm
  warmup_steps: int = 100  # linear warmup from 0
  min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
  entropy_adaptive: bool = True  # Velvet: the LR follows the predictive entropy
  perplexity_guided: bool = True  # Velvet: beta1 follows the perplexity
  sparse_aware: bool = True  # Velvet: exactly-zero gradients leave their weights alone
  # Velvet's rules: "original", "corrected", or a preset with fields replaced,
  # e.g. "original:bias_correction=product" (vesperjax/optim/velvet_rules.py)
  velvet_rules: str = "original"
  entropy_lr: bool = False  # non-Velvet optimizers: Velvet's entropy rule as an LR factor
  fused: bool = False  # Velvet's Pallas kernel (GPU; interpret mode elsewhere)
  # which fused kernel: auto (kernels/platform.py's velvet_kernel row), triton, mosaic
  # (GPU) or tpu (Mosaic TPU)
  fused_kernel: str = "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """`config.train`: the loop's batch, length and cadences, and how the steps run."""
  batch_size: int = 8  # global sequences per micro-step
  grad_accum: int = 1  # micro-steps per optimizer step
  max_steps: int = 1000
  eval_every: int = 200
  eval_batches: int = 8  # validation batches per evaluation (0: none)
  save_every: int = 500
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0  # model init and data order
  # the backend the steps are built for: auto (the mesh's devices, or the
  # VESPERJAX_PLATFORM environment variable), cpu, cuda, rocm or tpu
  platform: str = "auto"
  fused_loss: bool = True  # chunked linear cross-entropy (never materialises fp32 logits)
  resume: bool = True  # continue from WORKDIR's latest checkpoint when there is one
  # a fresh run starts from this export's weights (`python -m vesperjax.export`, fp32 or
  # bf16) with a fresh optimizer state; its model.* and tokenizer must match the export's
  init_from: str | None = None
  # divergence stops the run (non-zero exit, the last good checkpoint kept as latest):
  max_skipped_steps: int = 5  # this many consecutive non-finite steps (0: never)
  loss_spike_factor: float = 3.0  # a logged loss over this x the last 10's median (0: never)
  sample_tokens: int = 64  # tokens sampled at the end of training (0: none)
  sample_prompt: str = "def "
  # Weights & Biases (the `wandb` extra; the mode is W&B's own, e.g. WANDB_MODE=offline):
  wandb: bool = False  # also log the metrics and the config to W&B (from process 0)
  wandb_project: str = "vesperjax"
  wandb_entity: str | None = None  # default: the W&B account's default entity
  wandb_name: str | None = None  # the W&B run's name; default: the workdir's base name
  wandb_tags: str = ""  # comma-separated, e.g. "fineweb,baseline"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """`config.mesh`: devices per mesh axis (docs/scaling.md); -1 takes the rest."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run's configuration, typed: what library code takes.

  Made (and validated) from the ConfigDict of an experiment file by
  `RunConfig.from_config_dict`, which the CLI calls once; copies with changed keys by
  `replace`. `to_dict` is the JSON saved as WORKDIR/config.json, `from_dict` reads it
  back.
  """
  model: ModelOverrides = dataclasses.field(default_factory=ModelOverrides)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  @classmethod
  def from_config_dict(cls, cd: ConfigDict) -> "RunConfig":
    """The typed, validated run of an (overridden) experiment ConfigDict; a ValueError
    naming `config.section.key` for an unknown key, a wrong type or a bad value."""
    return validate(cls.from_dict(cd.to_dict()))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, ignore_unknown: bool = False) -> "RunConfig":
    """Sections from a dict of dicts (missing keys take their defaults), types checked,
    values not validated. `ignore_unknown`: skip keys the schema does not have (an older
    workdir's config.json), instead of refusing them."""
    sections = {}
    for name, kind in _SECTIONS.items():
      values = dict(d.get(name) or {})
      fields = _fields(kind)
      unknown = sorted(set(values) - set(fields))
      if unknown and not ignore_unknown:
        raise ValueError(f"config.{name}.{unknown[0]}: unknown key")
      sections[name] = kind(**{k: _typed(values[k], *fields[k], f"{name}.{k}")
                               for k in fields if k in values})
    unknown = sorted(set(d) - set(_SECTIONS))
    if unknown and not ignore_unknown:
      raise ValueError(f"config.{unknown[0]}: unknown section")
    return cls(**sections)

  def to_dict(self) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(self)

  def to_config_dict(self) -> ConfigDict:
    """This run as a ConfigDict typed by the schema (None keys are typed placeholders)."""
    c = ConfigDict()
    for name in _SECTIONS:
      section = getattr(self, name)
      c[name] = ConfigDict({k: _config_value(getattr(section, k), *typed, f"{name}.{k}")
                            for k, typed in _fields(type(section)).items()})
    return c

  def replace(self, **sections: Mapping[str, Any]) -> "RunConfig":
    """A copy with keys of some sections changed, e.g.
    `run.replace(optim=dict(lr=1e-3), train=dict(max_steps=50))` (not validated)."""
    return dataclasses.replace(self, **{
        name: dataclasses.replace(getattr(self, name), **values)
        for name, values in sections.items()})


_SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


def _value_type(hint) -> tuple[type, bool]:
  """(int, float, bool or str; whether None is allowed) of a field's annotation."""
  args = typing.get_args(hint)
  optional = (typing.get_origin(hint) in (typing.Union, types.UnionType)
              and type(None) in args)
  if optional:
    (hint,) = [a for a in args if a is not type(None)]
  if hint not in (int, float, bool, str):
    raise TypeError(f"config field type {hint!r} has no config key type")
  return hint, optional


def _fields(section: type) -> dict[str, tuple[type, bool]]:
  return {name: _value_type(hint) for name, hint in typing.get_type_hints(section).items()}


def _typed(value, kind: type, optional: bool, key: str):
  """`value` as the field's type (an int is a float; a bool is not an int)."""
  if value is None and optional:
    return None
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if type(value) is kind:  # pylint: disable=unidiomatic-typecheck
    return value
  want = kind.__name__ + (" or None" if optional else "")
  raise ValueError(f"config.{key}: expected {want}, got {value!r}")


def _config_value(value, kind: type, optional: bool, key: str):
  """A ConfigDict leaf typed `kind`: optional keys are FieldReferences (a placeholder when
  None), so that a None default still takes only `kind` values."""
  value = _typed(value, kind, optional, key)
  return config_dict.FieldReference(value, field_type=kind) if optional else value


def default_run_config(preset: str = "tiny") -> ConfigDict:
  """The schema's defaults with `model.preset=preset`, as a locked ConfigDict: what
  `experiments/*.py` edit and `--config.section.key=value` overrides."""
  c = RunConfig(model=ModelOverrides(preset=preset)).to_config_dict()
  c.lock()
  return c


def as_run_config(run: RunConfig | ConfigDict) -> RunConfig:
  """`run` itself, or a ConfigDict converted (and validated) by `from_config_dict`: for
  the entry points that also take an experiment's ConfigDict (Trainer, build_run)."""
  return run if isinstance(run, RunConfig) else RunConfig.from_config_dict(run)


def model_config(run: RunConfig, vocab_size: int | None = None) -> ModelConfig:
  """The ModelConfig a run trains: the preset with the non-None `model.*` keys over it.

  How the model runs (`model.dtype`, `model.remat`, `model.scan_layers`, ...) is part of
  the ModelConfig too; a run may resume with other values of those (EXECUTION_FIELDS).
  """
  overrides = {k: v for k, v in dataclasses.asdict(run.model).items()
               if k != "preset" and v is not None}
  if vocab_size is not None:
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
      raise ValueError(f"model.vocab_size={overrides['vocab_size']} is smaller than the "
                       f"tokenizer's {vocab_size} tokens")
    overrides.setdefault("vocab_size", vocab_size)
  return model_preset(run.model.preset, **overrides)


def validate(run: RunConfig) -> RunConfig:
  """`run`, or a one-line ValueError for a value no run can use (the model's own rules
  are ModelConfig's, checked when it is built)."""
  def need(ok, key, why):
    if not ok:
      raise ValueError(f"config.{key}: {why}")

  t, d, o = run.train, run.data, run.optim
  need(o.name in OPTIMIZERS, "optim.name",
       f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}")
  need(not (o.entropy_lr and o.name == "velvet"), "optim.entropy_lr",
       "Velvet has its own entropy rule (optim.entropy_adaptive); entropy_lr is for the "
       "other optimizers")
  from vesperjax.optim.velvet_rules import resolve_rules  # jax only once validating
  try:
    resolve_rules(o.velvet_rules)
  except ValueError as e:
    need(False, "optim.velvet_rules", str(e).removeprefix("Velvet: "))
  need(o.fused_kernel in ("auto", "triton", "mosaic", "tpu"), "optim.fused_kernel",
       f"{o.fused_kernel!r} is not auto, triton, mosaic or tpu")
  for key in ("lr", "b1", "b2", "eps", "weight_decay", "max_grad_norm", "min_lr_ratio"):
    value = getattr(o, key)
    need(math.isfinite(value), f"optim.{key}", f"must be finite, got {value}")
  for key, value in dataclasses.asdict(run.model).items():
    if isinstance(value, float):
      need(math.isfinite(value), f"model.{key}", f"must be finite, got {value}")
  need(o.lr > 0, "optim.lr", "must be positive")
  need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
  need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  for key in ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every",
              "keep_checkpoints", "log_every"):
    need(getattr(t, key) > 0, f"train.{key}", "must be positive")
  need(t.eval_batches >= 0, "train.eval_batches", "must be >= 0")
  need(t.max_skipped_steps >= 0, "train.max_skipped_steps", "must be >= 0 (0: never stop)")
  need(math.isfinite(t.loss_spike_factor) and (t.loss_spike_factor == 0
                                               or t.loss_spike_factor > 1),
       "train.loss_spike_factor", "must be 0 (off) or a finite number > 1")
  need(t.wandb_project.strip() != "", "train.wandb_project", "must not be empty")
  for tag in t.wandb_tags.split(","):  # W&B's rule: at most 64 characters
    need(len(tag.strip()) <= 64, "train.wandb_tags", f"{tag.strip()!r} is over 64 characters")
  need(d.seq_len > 1, "data.seq_len", "must be > 1")
  need(d.num_workers >= 0, "data.num_workers", "must be >= 0")
  if d.mixture is not None:
    need(d.dataset == DataConfig.dataset, "data.mixture",
         f"set data.mixture or data.dataset, not both (data.dataset={d.dataset!r})")
    from vesperjax.data import mixture  # pylint: disable=g-import-not-at-top
    try:
      mixture.parse_mixture(d.mixture)
    except ValueError as e:
      raise ValueError(f"config.data.mixture: {e}") from None
  if t.platform != "auto":
    from vesperjax.kernels import platform  # pylint: disable=g-import-not-at-top
    try:
      platform.normalize(t.platform)
    except ValueError as e:
      raise ValueError(f"config.train.platform: {e}") from None
  return run
