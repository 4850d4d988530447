"""Every command answers --help (its usage, its flags and, with --config, the config keys)
and --version, exit 0; a config value a run uses other than given is named in one
`warning:` line."""
import os
import subprocess
import sys

import pytest

import vesperjax
from vesperjax.optim.field import adjusted_values, lr_schedule, warmup_steps
from vesperjax.run_config import OptimConfig
from tests.test_train import overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_KEYS = ["config keys:", "optim: name=velvet lr=0.0005", "train: batch_size=8",
               "warmup_steps=100", "docs/configuration.md"]
COMMANDS = {  # command line: what its --help must show
    "train": ["python -m vesperjax.train --config", "--config=FILE", "--workdir=STRING",
              "--[no]resume", *CONFIG_KEYS],
    "generate": ["python -m vesperjax.generate --workdir RUN", "--prompt=STRING",
                 "--max-tokens=INT", "--temperature=FLOAT", "--quantize=int8|int4",
                 "--[no]best"],
    "export": ["python -m vesperjax.export --workdir RUN", "--out=STRING", "--step=INT",
               "--dtype=bf16|fp32", "--max-shard-size=STRING"],
    "eval": ["python -m vesperjax.eval --model DIR --tasks", "--model=STRING",
             "--tasks=STRINGS", "--include-path=STRING", "--batch-size=STRING",
             "--limit=INT", "--[no]log-samples"],
    "plan": ["python -m vesperjax.plan --config FILE --target", "--target=STRING",
             "--[no]max-batch", "--devices=INT", *CONFIG_KEYS],
    "benchmark": ["python -m vesperjax.benchmark {optimizers", "--report=STRING",
                  "--optimizers=STRINGS", "--seeds=INT", *CONFIG_KEYS],
    "benchmark plot": ["python -m vesperjax.benchmark {optimizers", "--report=STRING"],
    "data": ["python -m vesperjax.data build|info", "{build,info}", "--version",
             "build --help"],
    "data build": ["--dataset DATASET", "--tokenizer TOKENIZER", "--out OUT"],
    "studio": ["python -m vesperjax.studio --runs", "--runs=STRING", "--port=INT",
               "--token=STRING", "--data-root=STRING"],
}


def command(line: str, *args: str):
  module, *sub = line.split()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", f"vesperjax.{module}", *sub, *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("line", sorted(COMMANDS))
def test_help_prints_the_usage_and_the_flags(line):
  r = command(line, "--help")
  assert r.returncode == 0, r.stderr
  for needle in COMMANDS[line]:
    assert needle in r.stdout, (needle, r.stdout)
  assert "error" not in r.stderr.lower() and "Traceback" not in r.stderr
  if not line.startswith("data"):  # absl's own flags are no business of the user's
    assert "--logtostderr" not in r.stdout and "--flagfile" not in r.stdout
    assert "--help" in r.stdout and "--version" in r.stdout


@pytest.mark.parametrize("line", ["train", "generate", "export", "eval", "plan", "benchmark",
                                  "benchmark throughput", "data", "studio"])
def test_version_prints_the_version(line):
  r = command(line, "--version")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == f"vesperjax {vesperjax.__version__}"


def test_short_help_flag_and_help_after_other_flags():
  r = command("export", "--workdir=x", "-h")
  assert r.returncode == 0 and "--out=STRING" in r.stdout, r.stderr


def test_warmup_longer_than_the_run_is_capped_with_a_warning():
  long = OptimConfig(warmup_steps=100)
  assert warmup_steps(long, 50) == 49 and warmup_steps(OptimConfig(warmup_steps=10), 50) == 10
  assert adjusted_values(OptimConfig(warmup_steps=10), 50) == []
  (line,) = adjusted_values(long, 50)
  assert "config.optim.warmup_steps=100" in line and "using 49" in line
  assert float(lr_schedule(long, 50)(49)) == pytest.approx(long.lr)  # the peak is reached


def test_train_warns_once_when_it_caps_the_warmup(corpus, tmp_path, capsys):
  from vesperjax import train as train_cli
  args = overrides(corpus, tmp_path / "run")
  args[1] = os.path.join(ROOT, args[1])  # experiments/tiny.py from any working directory
  code = train_cli.main(["train", *args, "--config.train.max_steps=2",
                         "--config.train.eval_every=2", "--config.train.save_every=2",
                         "--config.optim.warmup_steps=100"])
  assert code == 0
  warnings = [ln for ln in capsys.readouterr().err.splitlines() if "warning:" in ln]
  assert warnings == ["warning: config.optim.warmup_steps=100 is not below the run's 2 "
                      "steps: using 1 (the warmup must end before the last step)"]
