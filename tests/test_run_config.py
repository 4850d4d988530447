"""The run schema: the ConfigDict experiments edit is generated from the typed sections,
`--config.*` overrides arrive typed, and the one conversion checks keys and types."""
import dataclasses
import glob
import importlib.util
import math
import os
import typing

import pytest
from absl import flags
from ml_collections import config_flags

from vesperjax.cli import load_run_config, run_cli
from vesperjax.config import PRESET_NAMES, ModelConfig
from vesperjax.run_config import (DataConfig, MeshConfig, ModelOverrides, OptimConfig,
                                  RunConfig, TrainConfig, as_run_config,
                                  default_run_config, model_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = {"model": ModelOverrides, "data": DataConfig, "optim": OptimConfig,
            "train": TrainConfig, "mesh": MeshConfig}


def _declared(hint):
  """(value type, optional) of a dataclass annotation, read independently of the module."""
  args = typing.get_args(hint)
  if type(None) in args:
    (kind,) = [a for a in args if a is not type(None)]
    return kind, True
  return hint, False


def test_generated_config_dict_agrees_with_the_dataclasses():
  assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)
  c = default_run_config("medium")
  assert sorted(c.keys()) == sorted(SECTIONS)
  for name, section in SECTIONS.items():
    hints = typing.get_type_hints(section)
    assert sorted(c[name].keys()) == sorted(hints), name
    for field in dataclasses.fields(section):
      key = f"{name}.{field.name}"
      default = "medium" if key == "model.preset" else field.default
      value = c[name][field.name]
      assert value == default and type(value) is type(default), (key, value, default)
      kind, optional = _declared(hints[field.name])
      assert c[name].get_type(field.name) is kind, key  # typed even when None
      assert kind in (int, float, bool, str) and optional == (default is None), key


def test_every_model_field_is_an_optional_model_key():
  hints = typing.get_type_hints(ModelOverrides)
  for name, hint in typing.get_type_hints(ModelConfig).items():
    assert hints[name] == hint | None, name
    assert getattr(ModelOverrides(), name) is None
  assert set(hints) == set(typing.get_type_hints(ModelConfig)) | {"preset"}


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_defaults_convert_to_the_dataclass_defaults(preset):
  run = RunConfig.from_config_dict(default_run_config(preset))
  assert run == RunConfig(model=ModelOverrides(preset=preset))
  assert RunConfig.from_dict(run.to_dict()) == run
  assert RunConfig.from_config_dict(run.to_config_dict()) == run


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))))
def test_experiment_files_convert(path):
  spec = importlib.util.spec_from_file_location("experiment", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  run = RunConfig.from_config_dict(mod.get_config())
  model_config(run)  # a valid model too
  assert as_run_config(run) is run


def _cli(capsys, *overrides):
  """The config that `vesperjax.train` would get for experiments/tiny_moe.py + overrides:
  (exit status, RunConfig or None, stderr)."""
  values = flags.FlagValues()
  flag = config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                         lock_config=True)
  got = {}

  def body():
    got["run"] = load_run_config(flag)
    return 0

  code = run_cli(["prog", "--config", os.path.join(ROOT, "experiments", "tiny_moe.py"),
                  *overrides], body, flag_values=values)
  return code, got.get("run"), capsys.readouterr().err


def test_optional_model_keys_take_numbers_from_the_command_line(capsys):
  code, run, err = _cli(capsys, "--config.model.moe_capacity_factor=1.25",
                        "--config.model.attention_impl=xla")
  assert code == 0, err
  assert run.model.moe_capacity_factor == 1.25 and run.model.attention_impl == "xla"
  config = model_config(run)
  assert config.moe_capacity_factor == 1.25 and config.attention_impl == "xla"
  code, run, err = _cli(capsys, "--config.model.moe_capacity_factor=2")
  assert code == 0, err
  assert type(run.model.moe_capacity_factor) is float and run.model.moe_capacity_factor == 2
  code, run, err = _cli(capsys)  # left out: the preset's value (dropless)
  assert code == 0 and run.model.moe_capacity_factor is None
  assert model_config(run).moe_capacity_factor is None


@pytest.mark.parametrize("override", ["--config.model.moe_capacity_factor=None",
                                      "--config.model.num_layers=None",
                                      "--config.model.moe_capacity_factor=lots"])
def test_none_is_not_a_command_line_value(capsys, override):
  """As documented (README, run_config): to keep the preset's value, leave the key out."""
  code, run, err = _cli(capsys, override)
  lines = err.strip().splitlines()
  assert code == 2 and run is None and len(lines) == 1, err
  assert lines[0].startswith("error: ") and override.split("=")[0][2:] in lines[0], err
  assert ("leave the key out" in lines[0]) == override.endswith("=None"), err


def test_conversion_names_the_key():
  with pytest.raises(ValueError, match=r"^config\.train\.batch_size: expected int, got '8'$"):
    RunConfig.from_dict({"train": {"batch_size": "8"}})
  with pytest.raises(ValueError, match=r"^config\.optim\.fused: expected bool, got 1$"):
    RunConfig.from_dict({"optim": {"fused": 1}})
  with pytest.raises(ValueError, match=r"^config\.train\.seed: expected int, got True$"):
    RunConfig.from_dict({"train": {"seed": True}})
  with pytest.raises(ValueError, match=r"^config\.data\.seq_len: expected int, got None$"):
    RunConfig.from_dict({"data": {"seq_len": None}})
  with pytest.raises(ValueError, match=r"^config\.train\.dtype: unknown key$"):
    RunConfig.from_dict({"train": {"dtype": "float32"}})
  with pytest.raises(ValueError, match=r"^config\.extra: unknown section$"):
    RunConfig.from_dict({"extra": {}})
  run = RunConfig.from_dict({"optim": {"lr": 1}, "model": {"rope_theta": 5}})
  assert type(run.optim.lr) is float and type(run.model.rope_theta) is float
  cd = default_run_config()
  cd.train.batch_size = 0
  with pytest.raises(ValueError, match=r"^config\.train\.batch_size: must be positive$"):
    RunConfig.from_config_dict(cd)
  cd.train.batch_size, cd.optim.lr = 8, math.inf
  with pytest.raises(ValueError, match=r"^config\.optim\.lr: must be finite, got inf$"):
    as_run_config(cd)
  cd.optim.lr, cd.optim.fused_kernel = 1e-3, "cuda"
  with pytest.raises(ValueError, match=r"^config\.optim\.fused_kernel: 'cuda' is not auto"):
    as_run_config(cd)


def test_an_older_config_json_still_reads():
  """A workdir's config.json from before `dtype`/`remat`/`scan_layers` moved to `model`,
  and before some keys existed: unknown keys are skipped, missing ones take defaults."""
  old = RunConfig().to_dict()
  old["train"].update(dtype="bfloat16", remat="full", scan_layers=True)
  del old["train"]["platform"], old["data"]["num_workers"]
  old["optim"]["lr"] = 1e-3
  run = RunConfig.from_dict(old, ignore_unknown=True)
  assert run.optim.lr == 1e-3 and run.train.platform == "auto"
  assert run.data.num_workers == 0


def test_replace_and_frozen():
  run = RunConfig()
  other = run.replace(optim=dict(name="adamw", lr=1e-2), train=dict(max_steps=5))
  assert (other.optim.name, other.optim.lr, other.train.max_steps) == ("adamw", 1e-2, 5)
  assert other.optim.b1 == run.optim.b1 and run.optim.name == "velvet"
  with pytest.raises(dataclasses.FrozenInstanceError):
    run.train.max_steps = 3  # type: ignore[misc]
  with pytest.raises(TypeError):
    run.replace(train=dict(no_such_key=1))
