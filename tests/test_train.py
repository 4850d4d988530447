"""Training: end to end, exact resume, signals, non-finite steps, CLI errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.run_config import default_run_config
from vesperjax.train import train
from vesperjax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(corpus, **train):
  run = default_run_config("tiny")
  run.model.update(dict(hidden_size=32, num_heads=2, num_layers=1, ffn_size=64,
                        lora_rank=4, lora_topk=2))
  run.data.update(dict(dataset=corpus, tokenizer="byte", seq_len=32))
  run.optim.update(dict(lr=3e-3, warmup_steps=2))
  run.train.update(dict(batch_size=8, max_steps=8, eval_every=4, save_every=4, log_every=1,
                        eval_batches=2, sample_tokens=0))
  run.train.update(train)
  return run


def losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        out[rec["step"]] = rec["loss"]
  return out


def test_end_to_end_run_writes_everything(corpus, tmp_path):
  run = tiny_run(corpus, max_steps=6, sample_tokens=5, grad_accum=2)
  assert train(run, str(tmp_path)) == 0
  for name in ("config.json", "model_config.json", "tokenizer.json", "metrics.jsonl"):
    assert (tmp_path / name).exists(), name
  # the same JSON as the experiment's ConfigDict: sections of keys, None as null
  assert json.load(open(tmp_path / "config.json")) == json.loads(run.to_json_best_effort())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]
  assert os.listdir(tmp_path / "best")
  recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  steps = [r for r in recs if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 7))
  for key in ("learning_rate", "b1", "entropy_scale", "perplexity_scale", "grad_norm",
              "entropy", "perplexity"):
    assert all(np.isfinite(r[key]) for r in steps), key
  # Velvet's scales through the trainer: the formula's (float64 numpy) for each step's
  # logged loss and entropy with ln V of the run's tokenizer, and not the neutral 1.0
  # that a step handing Velvet no signal would log
  from tests.optim.test_velvet import np_scales
  from vesperjax.data import Tokenizer
  vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).vocab_size
  for r in steps:
    es, ps = np_scales(r["loss"], r["entropy"], vocab=vocab)
    assert r["entropy_scale"] == pytest.approx(es, rel=1e-5), r
    assert r["perplexity_scale"] == pytest.approx(ps, rel=1e-5), r
    assert es != 1.0 and ps != 1.0, r
  assert any("eval_loss" in r for r in recs)
  assert any(tb.startswith("events") for tb in os.listdir(tmp_path / "tb"))


def test_resume_continues_exactly(corpus, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  run = tiny_run(corpus, max_steps=8, save_every=100)
  assert train(run, str(straight)) == 0

  first = Trainer(run, str(split))
  out = first.train(stop_at=4)
  first.close()
  assert out.step == 4
  second = Trainer(run, str(split))
  assert int(second.state.step) == 4
  evals = [json.loads(line)["eval_loss"] for line in open(split / "metrics.jsonl")
           if "eval_loss" in line]
  assert second.built.ckpt.best_loss == pytest.approx(min(evals))  # a worse eval won't replace it
  second.train()
  second.close()

  a, b = losses(straight), losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  np.testing.assert_array_equal([a[s] for s in a], [b[s] for s in a])


def test_workdir_with_other_model_is_refused(corpus, tmp_path):
  assert train(tiny_run(corpus, max_steps=2), str(tmp_path)) == 0
  other = tiny_run(corpus, max_steps=2)
  other.model.hidden_size = 64
  with pytest.raises(RuntimeError, match="different model.*hidden_size"):
    Trainer(other, str(tmp_path))
  other = tiny_run(corpus, max_steps=2)
  other.data.tokenizer = "bpe:300"  # was "byte": refused, not silently ignored
  with pytest.raises(RuntimeError, match="trained with data.tokenizer='byte', not 'bpe:300'"):
    Trainer(other, str(tmp_path))
  rerun = tiny_run(corpus, max_steps=3)  # how the same model runs may change on resume
  rerun.model.remat, rerun.model.scan_layers = "full", False
  assert train(rerun, str(tmp_path)) == 0


def test_batch_must_split_over_the_mesh(corpus, tmp_path):
  with pytest.raises(RuntimeError, match="batch_size=12 must be a multiple of the 8"):
    Trainer(tiny_run(corpus, batch_size=12), str(tmp_path))
  assert not os.listdir(tmp_path)  # failed before touching the workdir


def test_non_finite_step_is_skipped_and_counted(corpus, tmp_path):
  trainer = Trainer(tiny_run(corpus), str(tmp_path))
  batch = trainer._next_batch()
  state, m = trainer.built.model.steps.train_step(trainer.state, batch)
  assert bool(m["finite"]) and int(m["skipped"]) == 0

  # poison one weight: the loss turns NaN and the update must not touch anything
  poisoned = jax.tree.map(lambda x: x, state)
  emb = poisoned.params["embed"]
  emb[...] = emb[...].at[:, 0].set(jnp.nan)
  before = jax.tree.map(np.asarray, (poisoned.params, poisoned.opt_state, poisoned.rest))
  after_state, m = trainer.built.model.steps.train_step(poisoned, batch)
  assert not bool(m["finite"]) and int(m["skipped"]) == 1
  assert int(after_state.step) == 2
  after = jax.tree.map(np.asarray, (after_state.params, after_state.opt_state,
                                    after_state.rest))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  trainer.state = after_state
  assert not trainer._finite()
  trainer._save(2)
  trainer.built.ckpt.wait()
  assert trainer.built.ckpt.latest_step() is None  # a NaN state is never checkpointed
  trainer.close()


def cli(*args, timeout=240, **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "vesperjax.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env, **popen)


def overrides(corpus, workdir):
  run = tiny_run(corpus)
  flat = [f"--config.model.{k}={v}" for k, v in run.model.items()
          if v is not None and k != "preset"]
  return ["--config", "experiments/tiny.py", f"--workdir={workdir}", *flat,
          f"--config.data.dataset={corpus}", "--config.data.tokenizer=byte",
          "--config.data.seq_len=32", "--config.train.batch_size=8",
          "--config.train.eval_batches=1", "--config.train.sample_tokens=0"]


@pytest.mark.parametrize("extra,message", [
    (["--config.train.no_such_key=1"], "no_such_key"),
    (["--config.train.batch_size=lots"], "batch_size"),
    (["--config.optim.name=sgd"], "optim.name"),
    (["--config.data.dataset=/no/such/file.txt"], "/no/such/file.txt"),
    (["--config.model.num_heads=3"], "hidden_size"),
    (["--config=experiments/no_such_preset.py"], "No such file"),
    (["--config=tests/fixtures/raising_config.py"], "cannot load --config: RuntimeError"),
    (["--config.train.batch_size=0"], "train.batch_size: must be positive"),
    (["--config.optim.lr=inf"], "optim.lr: must be finite"),
    (["--config.optim.b1=nan"], "optim.b1: must be finite"),
    # a float | None model field takes a number (the batch error shows it parsed)
    (["--config.model.moe_capacity_factor=1.25", "--config.train.batch_size=0"],
     "train.batch_size: must be positive"),
    (["--config.model.num_experts=2", "--config.model.moe_capacity_factor=-1"],
     "moe_capacity_factor"),
    # None is no command-line value: leaving the key out keeps the preset's
    (["--config.model.moe_capacity_factor=None"], "moe_capacity_factor=None"),
])
def test_cli_bad_input_is_one_line(corpus, tmp_path, extra, message):
  r = cli(*overrides(corpus, tmp_path / "run"), *extra)
  assert r.returncode == 2, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], r.stderr
  assert r.stderr.strip().splitlines()[-1] == errors[0]
  assert "Traceback" not in r.stderr


def test_sigterm_saves_restorable_checkpoint(corpus, tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = overrides(corpus, workdir) + ["--config.train.max_steps=100000",
                                       "--config.train.save_every=100000",
                                       "--config.train.eval_every=100000"]
  proc = subprocess.Popen([sys.executable, "-m", "vesperjax.train", *args], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 180
  while time.time() < deadline and (not metrics.exists() or len(losses(workdir)) < 3):
    time.sleep(0.5)
  second = cli(*args)  # a second trainer on the same workdir is refused, naming the first
  assert second.returncode == 2, second.stderr
  assert second.stderr.strip().splitlines()[-1].startswith("error: ")
  assert f"in use by another trainer, pid {proc.pid} on" in second.stderr
  assert "Traceback" not in second.stderr
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, err
  steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
  assert steps, err
  resumed = tiny_run(corpus, max_steps=max(steps) + 2)
  trainer = Trainer(resumed, str(workdir))
  assert int(trainer.state.step) == max(steps)
  out = trainer.train()
  trainer.close()
  assert out.step == max(steps) + 2 and np.isfinite(out.last_loss)


def test_moe_run_logs_expert_load(corpus, tmp_path):
  run = tiny_run(corpus, max_steps=2, eval_every=2, save_every=2)
  run.model.update(dict(num_experts=4, top_k=2))
  assert train(run, str(tmp_path)) == 0
  recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  last = [r for r in recs if "loss" in r][-1]
  load = [last[f"expert_load/{i}"] for i in range(4)]
  assert abs(sum(load) - 1) < 1e-5 and last["moe_dropped_tokens"] == 0
  assert np.isfinite(last["moe_balance_loss"])


def test_checkpoint_from_8_device_mesh_loads_on_one_device(corpus, tmp_path):
  from flax import nnx

  from vesperjax.inference.loading import load_model
  run = tiny_run(corpus, max_steps=2, eval_every=2, save_every=2)
  run.mesh.update(dict(data=1, fsdp=-1))  # params really split over the 8 devices
  trainer = Trainer(run, str(tmp_path))
  trainer.train()
  trainer.close()
  embed = trainer.state.params["embed"][...]
  assert len(embed.sharding.device_set) == 8 and not embed.sharding.is_fully_replicated
  model, tok, run = load_model(str(tmp_path))
  loaded = nnx.state(model, nnx.Param)
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(loaded))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded),
               jax.tree.map(np.asarray, trainer.state.params))
  assert tok.vocab_size == trainer.built.data.tokenizer.vocab_size and run.train.max_steps == 2


def test_load_model_reads_adamw_and_best_checkpoints(corpus, tmp_path):
  """Only the model's variables are restored, so the optimizer that wrote the checkpoint
  does not matter; --best reads the best checkpoint, --step any kept one."""
  from flax import nnx

  from vesperjax.inference.loading import load_model
  run = tiny_run(corpus, max_steps=3, eval_every=2, save_every=1)
  run.optim.name = "adamw"
  trainer = Trainer(run, str(tmp_path))
  trainer.train()
  trainer.close()
  # a workdir from before dtype/remat/scan_layers moved to `model` still loads
  saved = json.load(open(tmp_path / "config.json"))
  saved["train"].update(dtype="float32", remat="none", scan_layers=True)
  (tmp_path / "config.json").write_text(json.dumps(saved))
  params = lambda model: jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  latest, _, loaded_run = load_model(str(tmp_path))
  assert loaded_run.optim.name == "adamw" and loaded_run.train.max_steps == 3
  jax.tree.map(np.testing.assert_array_equal, params(latest),
               jax.tree.map(np.asarray, trainer.state.params))
  best_step = int(sorted(os.listdir(tmp_path / "best"))[-1])
  best, _, _ = load_model(str(tmp_path), best=True)
  at_step, _, _ = load_model(str(tmp_path), best_step)
  jax.tree.map(np.testing.assert_array_equal, params(best), params(at_step))
  earlier, _, _ = load_model(str(tmp_path), 1)
  assert not np.array_equal(params(earlier)["embed"][...], params(latest)["embed"][...])
  assert best.blocks.ffn.gate.deterministic is True  # eval mode


@pytest.mark.slow  # the default tier has it through SLURM (tests/test_slurm.py) and
# explicit JAX_* variables (tests/test_resume_elsewhere.py's two-process run)
def test_two_processes_match_one_process(corpus, tmp_path):
  """2 processes x 2 CPU devices on 127.0.0.1 train exactly like 1 process x 4 devices:
  same global batches (each host reads its rows), same losses."""
  import socket
  args = overrides(corpus, "") + ["--config.train.max_steps=4", "--config.train.log_every=1",
                                  "--config.train.eval_every=2", "--config.train.save_every=2",
                                  f"--config.data.cache_dir={tmp_path / 'cache'}"]
  args = [a for a in args if not a.startswith("--workdir")]

  def launch(workdir, devices, **env):
    # Output goes to files: children writing into undrained pipes can fill them and block.
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    log = open(f"{workdir}.{env.get('JAX_PROCESS_ID', 0)}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vesperjax.train", *args,
                             f"--workdir={workdir}"], cwd=ROOT, env=env, text=True,
                            stdout=log, stderr=subprocess.STDOUT)
    proc.log = log.name
    return proc

  def check(proc):
    code = proc.wait(timeout=300)
    assert code == 0, open(proc.log).read()[-3000:]

  check(launch(tmp_path / "one", 4))
  with socket.socket() as s:  # a free port, taken just before the coordinator binds it
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [launch(tmp_path / "two", 2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
  try:
    for p in procs:
      check(p)
  finally:
    for p in procs:
      p.kill()
  a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
