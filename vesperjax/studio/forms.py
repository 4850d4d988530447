"""The New run and benchmark forms, checked into typed values: what a job is started
from, what its job file records, and what Resume checks again (the same checks, so a job
file edited by someone else starts nothing a form could not)."""
from __future__ import annotations

import math
import re

from vesperjax.studio.paths import BadRequest, data_file, dataset_name, shown

TOKENIZER = re.compile(r"byte|bpe:[0-9]{3,6}")
INT_TEXT = re.compile(r"-?[0-9]{1,18}")  # ASCII only: str.isdigit also takes '²'
MODEL_INT = 1 << 31  # a model override's bound: larger is a typo, not a model
OPTIMIZERS = ("velvet", "adamw")
TRAIN_STEPS, BENCHMARK_STEPS = 10_000_000, 1_000_000


def as_int(value, key: str, lo: int, hi: int) -> int:
  """`value` (an int, or a string of digits) in [lo, hi]; 1.9 is refused, not cut to 1."""
  if isinstance(value, str) and INT_TEXT.fullmatch(value.strip()):
    value = int(value.strip())
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise BadRequest(f"{key}: give a whole number from {lo} to {hi} (got {shown(value)})")
  return value


def as_float(value, key: str, ok, why: str) -> float:
  """`value` (a number, or a string of one) as a finite float passing `ok`."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise BadRequest(f"{key}: {shown(value)} is not a number")
  try:
    x = float(value.strip() if isinstance(value, str) else value)
  except (ValueError, OverflowError):
    raise BadRequest(f"{key}: {shown(value)} is not a number") from None
  if not math.isfinite(x) or not ok(x):
    raise BadRequest(f"{key}: {shown(value)} {why}")
  return x


def _lr(value, key: str) -> float:
  return as_float(value, key, lambda x: 0 < x < 1, "must be a positive number below 1")


def _choice(form: dict, key: str, choices, default=None) -> str:
  value = form.get(key, default)
  if not isinstance(value, str) or value not in choices:
    raise BadRequest(f"{key}: {shown(value)} is not one of {', '.join(choices)}")
  return value


def _model(overrides) -> dict:
  """Model overrides as {field: value}: plain values only (the schema checks the rest)."""
  if not isinstance(overrides, dict):
    raise BadRequest("model: give overrides as {field: value}")
  for key, value in overrides.items():
    if isinstance(value, bool) or value is None:
      continue
    if isinstance(value, int) and -MODEL_INT < value < MODEL_INT:
      continue
    if isinstance(value, float) and math.isfinite(value):
      continue
    if isinstance(value, str) and len(value) <= 200:
      continue
    raise BadRequest(f"model.{key}: {shown(value)} is not a value a model field takes")
  return dict(overrides)


def train_form(form: dict, data_roots: list[str], max_steps: int = TRAIN_STEPS) -> dict:
  """The typed values of a New run form (dataset: "stdlib" or its real path under a data
  root); a BadRequest naming the first bad field."""
  from vesperjax.config import PRESET_NAMES
  dataset = form.get("dataset") or "stdlib"
  if dataset != "stdlib":
    dataset = data_file(data_roots, dataset)
  tokenizer = form.get("tokenizer") or "bpe:8192"
  if not isinstance(tokenizer, str) or not TOKENIZER.fullmatch(tokenizer):
    raise BadRequest(f"tokenizer: {shown(tokenizer)}: use byte or bpe:N (e.g. bpe:8192)")
  optimizer = form.get("optimizer")
  return dict(
      preset=_choice(form, "preset", PRESET_NAMES, "tiny"), dataset=dataset,
      tokenizer=tokenizer, model=_model(form.get("model") or {}),
      steps=as_int(form.get("steps"), "steps", 1, max_steps),
      seq_len=as_int(form.get("seq_len", 256), "seq_len", 8, 1 << 16),
      batch_size=as_int(form.get("batch_size", 8), "batch_size", 1, 4096),
      lr=_lr(form.get("lr", 5e-4), "lr"),
      optimizer=None if optimizer is None else _choice(form, "optimizer", OPTIMIZERS))


def benchmark_form(form: dict, data_roots: list[str]) -> dict:
  """The typed values of a benchmark form: a train form's, plus arms, lrs and seeds."""
  from vesperjax.bench.optimizers import ARMS
  typed = train_form(form, data_roots, BENCHMARK_STEPS)
  arms = form.get("arms") or ["velvet", "adamw"]
  if (not isinstance(arms, list) or not arms
      or any(not isinstance(a, str) or a not in ARMS for a in arms)):
    raise BadRequest(f"arms: choose from {', '.join(ARMS)}")
  lrs = form.get("lrs") or [typed["lr"]]
  if not isinstance(lrs, list) or not 1 <= len(lrs) <= 12:
    raise BadRequest("lrs: give 1 to 12 learning rates")
  return dict(typed, arms=list(dict.fromkeys(arms)), lrs=[_lr(x, "lrs") for x in lrs],
              seeds=as_int(form.get("seeds", 1), "seeds", 1, 16))


def run_config(typed: dict) -> dict:
  """The validated run config (a dict of sections) of a typed form."""
  from vesperjax.run_config import ModelOverrides, RunConfig, model_config, validate
  steps = typed["steps"]
  d = RunConfig(model=ModelOverrides(preset=typed["preset"])).to_dict()
  d["model"].update(typed["model"])
  d["data"].update(dataset=typed["dataset"], tokenizer=typed["tokenizer"],
                   seq_len=typed["seq_len"])
  d["train"].update(max_steps=steps, batch_size=typed["batch_size"],
                    eval_every=min(200, steps), save_every=min(500, steps),
                    log_every=max(1, min(10, steps // 20)))
  d["optim"].update(lr=typed["lr"], warmup_steps=min(100, steps // 10))
  if typed["optimizer"] is not None:
    d["optim"]["name"] = typed["optimizer"]
  try:
    run = validate(RunConfig.from_dict(d))
    model_config(run)  # the model's own rules (a layer count, head sizes, ...)
  except (TypeError, ValueError) as e:
    raise BadRequest(str(e).splitlines()[0]) from None
  return run.to_dict()


def recorded_form(recorded, data_roots: list[str]) -> dict:
  """A job file's recorded form as form input again (its dataset, a real path, named
  relative to a data root), for Resume to check like a new form."""
  if not isinstance(recorded, dict):
    raise BadRequest("its job file records no form to resume from", status=409)
  dataset = recorded.get("dataset")
  if dataset != "stdlib":
    dataset = dataset_name(data_roots, dataset)
  return dict(recorded, dataset=dataset)


def form_of_config(config) -> dict:
  """The form fields of a run's config.json (a run this studio did not start), for
  Resume; the fields a form has no field for must keep the studio's values (checked by
  the caller), so nothing else of the file is used."""
  if not isinstance(config, dict):
    raise BadRequest("it has no readable config.json", status=409)
  model, data, optim, train = (config.get(k) if isinstance(config.get(k), dict) else {}
                               for k in ("model", "data", "optim", "train"))
  return dict(preset=model.get("preset"), dataset=data.get("dataset"),
              model={k: v for k, v in model.items() if k != "preset" and v is not None},
              tokenizer=data.get("tokenizer"), seq_len=data.get("seq_len"),
              batch_size=train.get("batch_size"), lr=optim.get("lr"),
              optimizer=optim.get("name"), steps=train.get("max_steps"))


def config_differences(config: dict, rebuilt: dict) -> list[str]:
  """`section.key` of each value of a run's config.json that the studio's config for
  the same form would change (a run set up from a shell); [] when none."""
  from vesperjax.run_config import RunConfig
  try:
    saved = RunConfig.from_dict(config, ignore_unknown=True).to_dict()
  except (TypeError, ValueError) as e:
    raise BadRequest(f"its config.json: {str(e).splitlines()[0]}", status=409) from None
  return [f"{section}.{key}" for section, values in saved.items()
          for key, value in values.items() if rebuilt[section].get(key) != value]
