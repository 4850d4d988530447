"""Weights & Biases tracking (`train.wandb=True`), in W&B's offline mode: no network, and
nothing written outside tmp_path. What W&B recorded is read back from the offline run's
transaction log (WORKDIR/wandb/offline-run-*/run-ID.wandb)."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys

import pytest

from tests.test_train import ROOT, losses, overrides, tiny_run
from vesperjax.config import ModelConfig
from vesperjax.model.size import num_params
from vesperjax.run_config import RunConfig
from vesperjax.train import train
from vesperjax.training.trainer import RunError, Trainer
from vesperjax.training.wandb_tracking import RUN_ID_FILE, parse_tags

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the skip)

QUIET_OFFLINE = dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off",
                     WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true",
                     WANDB_ERROR_REPORTING="false", WANDB_X_DISABLE_STATS="true",
                     WANDB_X_DISABLE_MACHINE_INFO="true")


def wandb_env(home) -> dict:
  """W&B's environment for a test: offline and quiet, every W&B folder under `home`."""
  return dict(QUIET_OFFLINE, WANDB_CONFIG_DIR=str(home / "config"),
              WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"),
              WANDB_ARTIFACT_DIR=str(home / "artifacts"), NETRC=str(home / "netrc"))


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
  for key in [k for k in os.environ if k.startswith("WANDB_")]:
    monkeypatch.delenv(key)
  for key, value in wandb_env(tmp_path / "wandb-home").items():
    monkeypatch.setenv(key, value)
  wandb.teardown()  # W&B reads its environment once per session
  yield
  wandb.teardown()


def read_records(path):
  """The records of a .wandb transaction log: a 7-byte header (":W&B", 0xBEE1, version)
  then LevelDB-log chunks (CRC32, length, type: full/first/middle/last) in 32 KiB
  blocks, each record a wandb_internal_pb2.Record."""
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", data[:7]
  pos, chunk, block = 7, b"", 32768
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # a block's tail too short for a chunk header is padding
      pos += left
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:  # zero padding up to the block's end
      pos += left
      continue
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # full, last
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      chunk = b""
      yield record


def offline_runs(workdir):
  """[(run record, {step: {key: value}} history, config, exit code)] of each W&B run
  written under WORKDIR/wandb, oldest first."""
  runs = []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb"))):
    run, history, config, exit_code = None, {}, {}, None
    for rec in read_records(path):
      kind = rec.WhichOneof("record_type")
      if kind == "run":
        run = rec.run
        config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
      elif kind == "history":
        row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
               for i in rec.history.item}
        history[row["_step"]] = row
      elif kind == "config":
        config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
      elif kind == "exit":
        exit_code = rec.exit.exit_code
    runs.append((run, history, config, exit_code))
  return runs


def jsonl(workdir):
  """{step: merged record} of WORKDIR/metrics.jsonl."""
  rows = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    rows.setdefault(rec.pop("step"), {}).update(rec)
  return rows


def wandb_run(corpus, **train_keys):
  return tiny_run(corpus, wandb=True, **train_keys)


def test_offline_run_logs_what_metrics_jsonl_holds_and_the_config(corpus, tmp_path):
  workdir = tmp_path / "tiny-wb"
  run = wandb_run(corpus, max_steps=3, eval_every=2, save_every=2,
                  wandb_project="vj-test", wandb_tags="fineweb, baseline,")
  assert train(run, str(workdir)) == 0
  (meta, history, config, exit_code), = offline_runs(workdir)
  assert meta.run_id == open(workdir / RUN_ID_FILE).read().strip()
  assert meta.project == "vj-test" and meta.display_name == "tiny-wb"  # the workdir's name
  assert list(meta.tags) == ["fineweb", "baseline"] and exit_code == 0
  expected = jsonl(workdir)
  assert sorted(history) == sorted(expected) == [1, 2, 3]
  for step, row in expected.items():  # every scalar, train and eval, at its step
    assert {k: history[step][k] for k in row} == row, step
  assert "eval_loss" in history[2] and "eval_loss" in history[3]
  typed = RunConfig.from_config_dict(run)
  for section, values in typed.to_dict().items():
    assert config[section] == values, section
  assert config["model_config"] == json.load(open(workdir / "model_config.json"))
  resolved = ModelConfig.from_dict(config["model_config"])
  assert resolved.hidden_size == 32 and config["params_trainable"] == num_params(resolved)


def test_resumed_training_resumes_the_wandb_run(corpus, tmp_path):
  run = wandb_run(corpus, max_steps=3, eval_every=100, save_every=2)
  first = Trainer(run, str(tmp_path))
  first.train(stop_at=2)
  first.close()
  run_id = open(tmp_path / RUN_ID_FILE).read().strip()
  run.train.max_steps = 4  # a changed key replaces the old value in the W&B config
  second = Trainer(run, str(tmp_path))
  assert int(second.state.step) == 2
  second.train()
  second.close()
  (a, history_a, _, code_a), (b, history_b, config_b, code_b) = offline_runs(tmp_path)
  assert a.run_id == b.run_id == run_id and code_a == code_b == 0
  assert config_b["train"]["max_steps"] == 4
  assert sorted(history_a) == [1, 2] and sorted(history_b) == [3, 4]
  logged = {s: r["loss"] for h in (history_a, history_b) for s, r in h.items()}
  assert logged == losses(tmp_path)

  fresh = wandb_run(corpus, max_steps=1, resume=False)  # from step 0: a new W&B run
  assert train(fresh, str(tmp_path)) == 0
  assert open(tmp_path / RUN_ID_FILE).read().strip() != run_id


def test_sigterm_and_divergence_end_the_wandb_run_with_their_status(corpus, tmp_path):
  run = wandb_run(corpus, max_steps=50, eval_every=100, save_every=100)
  trainer = Trainer(run, str(tmp_path / "signal"))
  next_batch = trainer._next_batch  # pylint: disable=protected-access

  def batch_then_sigterm():
    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler: stop after this step
    return next_batch()

  trainer._next_batch = batch_then_sigterm  # pylint: disable=protected-access
  out = trainer.train()
  trainer.close()
  assert out.stopped_by == "SIGTERM" and out.step == 1
  (_, history, _, exit_code), = offline_runs(tmp_path / "signal")
  assert exit_code == 128 + signal.SIGTERM and sorted(history) == [1]

  diverging = wandb_run(corpus, max_steps=30, eval_every=100, save_every=100)
  diverging.optim.update(dict(lr=1e6, warmup_steps=2))
  trainer = Trainer(diverging, str(tmp_path / "diverged"))
  with pytest.raises(RunError, match="the run diverged"):
    trainer.train()
  trainer.close()
  (_, _, _, exit_code), = offline_runs(tmp_path / "diverged")
  assert exit_code == 2  # the command's status for a diverged run


def test_missing_package_is_one_error_before_the_workdir_is_touched(corpus, tmp_path,
                                                                    monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(RunError, match=r"pip install 'vesperjax\[wandb\]'"):
    Trainer(wandb_run(corpus), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_online_mode_without_an_api_key_is_one_cli_error(corpus, tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="online")
  env.pop("XLA_FLAGS", None)
  env.pop("WANDB_API_KEY", None)
  r = subprocess.run([sys.executable, "-m", "vesperjax.train", *overrides(corpus, workdir),
                      "--config.train.wandb=True"], cwd=ROOT, capture_output=True,
                     text=True, timeout=240, env=env)
  assert r.returncode == 2, r.stderr
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: train.wandb=True: no W&B API key"), r.stderr
  assert "Traceback" not in r.stderr
  assert not workdir.exists()  # refused before any data was read or written


def test_online_api_key_is_checked_without_the_network(monkeypatch):
  """A key of the right form passes (it is not verified: no network); a malformed one
  is refused in one line."""
  from vesperjax.training.wandb_tracking import require_wandb
  monkeypatch.setenv("WANDB_MODE", "online")
  monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
  monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
  wandb.teardown()
  require_wandb()
  monkeypatch.setenv("WANDB_API_KEY", "k" * 5)  # W&B keys have 40 characters or more
  wandb.teardown()
  with pytest.raises(RunError, match="train.wandb=True: WANDB_API_KEY invalid"):
    require_wandb()


def test_tags_and_their_validation():
  assert parse_tags("") == [] and parse_tags(" a, b ,,c ") == ["a", "b", "c"]
  run = RunConfig().replace(train=dict(wandb_tags="ok," + "x" * 65))
  with pytest.raises(ValueError, match="config.train.wandb_tags: 'x+' is over 64"):
    RunConfig.from_config_dict(run.to_config_dict())
