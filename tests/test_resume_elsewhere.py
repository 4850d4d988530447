"""Resume on another allocation: a checkpoint continues on another device count, mesh or
process count with the uninterrupted run's losses, step and RNG, and the same data.

Each segment of a run is a subprocess (`python -m tests.test_resume_elsewhere`, the
`worker` below) with its own simulated CPU device count, and, for two processes, the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID launch; it trains with
`Trainer.train(stop_at=...)`, so every segment keeps the full run's LR schedule. The
reference is the same run uninterrupted in one process with the same total devices.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TIMEOUT_S = 300


def run_config(corpus: str, mesh: dict, moe: bool, steps: int = STEPS):
  from tests.test_train import tiny_run
  run = tiny_run(corpus, max_steps=steps, eval_every=2, save_every=2)
  run.mesh.update({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh})
  if moe:
    run.model.update(dict(num_experts=4, top_k=2))
  return run


def worker(argv=None) -> None:
  """One segment: train WORKDIR up to --stop-at; process 0 prints step, RNG, norms."""
  p = argparse.ArgumentParser()
  p.add_argument("--workdir")
  p.add_argument("--corpus")
  p.add_argument("--mesh", default="{}")
  p.add_argument("--moe", action="store_true")
  p.add_argument("--steps", type=int, default=STEPS)
  p.add_argument("--stop-at", type=int)
  a = p.parse_args(argv)
  import jax
  import optax

  from vesperjax import distributed
  from vesperjax.training.trainer import Trainer
  distributed.maybe_initialize_distributed()
  trainer = Trainer(run_config(a.corpus, json.loads(a.mesh), a.moe, a.steps), a.workdir)
  out = trainer.train(stop_at=a.stop_at)
  trainer.close()
  s = trainer.state
  local = lambda x: np.asarray(x.addressable_data(0))  # noqa: E731  (replicated scalars)
  norm = jax.jit(optax.global_norm)  # every process runs it: a collective over the mesh
  params_norm, opt_norm = norm(s.params), norm(s.opt_state)
  if jax.process_index() == 0:
    print(json.dumps({"step": out.step, "state_step": int(local(s.step)),
                      "rng": local(s.rng).tolist(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "params_norm": float(local(params_norm)),
                      "opt_norm": float(local(opt_norm))}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def segment(workdir, corpus, *, devices: int, processes: int = 1, mesh: dict,
            moe: bool = False, stop_at: int | None = None,
            steps: int = STEPS) -> tuple[dict, str]:
  """Run one segment of a `steps`-step run; (process 0's JSON line, its stderr)."""
  cmd = ["-m", "tests.test_resume_elsewhere", "--workdir", str(workdir), "--corpus",
         corpus, "--mesh", json.dumps(mesh), "--steps", str(steps)]
  cmd += ["--moe"] * moe + ([] if stop_at is None else ["--stop-at", str(stop_at)])
  ran = launch(cmd, workdir, devices=devices, processes=processes)
  for code, _, err in ran:
    assert code == 0, f"segment exited {code}:\n{err[-3000:]}"
  return json.loads(ran[0][1].strip().splitlines()[-1]), ran[0][2]


def launch(args: list[str], logs_at, *, devices: int,
           processes: int) -> list[tuple[int, str, str]]:
  """`python ARGS` as `processes` processes of `devices` CPU devices each (their output
  in files beside `logs_at`); (exit status, stdout, stderr) of each."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):  # the tests' shared cache
    if k in os.environ:
      env[k] = os.environ[k]
  cmd = [sys.executable, *args]
  port = _free_port()
  procs, logs = [], []
  for i in range(processes):
    e = dict(env)
    if processes > 1:
      e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
    # output goes to files: children writing into undrained pipes can fill them and block
    logs.append((open(f"{logs_at}.{i}.out", "w+"), open(f"{logs_at}.{i}.err", "w+")))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=logs[-1][0],
                                  stderr=logs[-1][1], text=True))
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  ran = []
  for p, (out, err) in zip(procs, logs):
    out.seek(0), err.seek(0)
    ran.append((p.returncode, out.read(), err.read()))
    out.close(), err.close()
  return ran


def metrics(workdir) -> tuple[dict, dict]:
  """({step: train loss}, {step: eval loss}) of WORKDIR/metrics.jsonl."""
  from vesperjax.training.metrics_log import read_records
  recs = read_records(os.path.join(workdir, "metrics.jsonl"))
  return ({r["step"]: r["loss"] for r in recs if "loss" in r},
          {r["step"]: r["eval_loss"] for r in recs if "eval_loss" in r})


def assert_same_run(got_dir, got_end: dict, want_dir, want_end: dict, steps: int):
  """Per-step train and eval losses, step, RNG and the norms of the parameters and
  optimizer state equal the uninterrupted run's (the float tolerance covers reductions
  ordered differently over other device counts)."""
  (a, ea), (b, eb) = metrics(got_dir), metrics(want_dir)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  assert sorted(ea) == sorted(eb) and ea
  np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose([ea[s] for s in eb], [eb[s] for s in eb], rtol=2e-5)
  assert got_end["step"] == got_end["state_step"] == want_end["step"] == steps
  assert got_end["rng"] == want_end["rng"]  # split once per step, carried in the state
  for key in ("params_norm", "opt_norm"):
    assert got_end[key] == pytest.approx(want_end[key], rel=2e-5), key


@pytest.fixture(scope="module")
def fsdp4_reference(corpus, tmp_path_factory):
  """The dense run uninterrupted: one process, four devices, fsdp=4."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  end, _ = segment(workdir, corpus, devices=4, mesh={"fsdp": 4})
  return workdir, end


def test_two_process_fsdp4_checkpoint_resumes_in_one_process_on_2_then_1_devices(
    corpus, tmp_path, fsdp4_reference):
  """fsdp=4 over 2 processes x 2 devices (steps 1-2) -> 1 process, fsdp=2 (3-4) ->
  1 process, 1 device (5-6): the process count and the device count both change."""
  run = tmp_path / "run"
  first, _ = segment(run, corpus, devices=2, processes=2, mesh={"fsdp": 4}, stop_at=2)
  assert (first["processes"], first["devices"], first["step"]) == (2, 4, 2)
  assert sorted(os.listdir(run / "checkpoints" / "2" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  second, err = segment(run, corpus, devices=2, mesh={"fsdp": 2}, stop_at=4)
  assert "resumed from step 2" in err
  assert ("the data position was saved by 2 process(es), this run has 1: it continues "
          "from the same global batch") in err
  assert not (run / "corrupt").exists()  # the 2-process checkpoint was not set aside
  assert (second["processes"], second["devices"], second["step"]) == (1, 2, 4)
  third, err = segment(run, corpus, devices=1, mesh={}, stop_at=None)
  assert "resumed from step 4" in err and "data position" not in err
  assert third["devices"] == 1
  assert_same_run(run, third, *fsdp4_reference, STEPS)


@pytest.mark.slow
def test_one_device_checkpoint_resumes_in_two_processes(corpus, tmp_path, fsdp4_reference):
  """1 process, 1 device (steps 1-3) -> 2 processes x 2 devices, fsdp=4 (4-6)."""
  run = tmp_path / "run"
  segment(run, corpus, devices=1, mesh={}, stop_at=3)
  end, err = segment(run, corpus, devices=2, processes=2, mesh={"fsdp": 4})
  assert "saved by 1 process(es), this run has 2" in err
  assert (end["processes"], end["devices"]) == (2, 4)
  assert_same_run(run, end, *fsdp4_reference, STEPS)


@pytest.mark.slow
def test_moe_data2_expert2_checkpoint_resumes_on_one_device(corpus, tmp_path):
  """MoE on data=2 x expert=2 (steps 1-2) -> one device (3-4)."""
  steps, mesh = 4, {"data": 2, "expert": 2}
  want_dir = tmp_path / "reference"
  want, _ = segment(want_dir, corpus, devices=4, mesh=mesh, moe=True, steps=steps)
  run = tmp_path / "run"
  segment(run, corpus, devices=4, mesh=mesh, moe=True, stop_at=2, steps=steps)
  end, err = segment(run, corpus, devices=1, mesh={}, moe=True, steps=steps)
  assert "resumed from step 2" in err
  assert_same_run(run, end, want_dir, want, steps)


def test_process_count_that_does_not_divide_the_batch_shards_is_one_error_line(
    corpus, tmp_path):
  """2 processes x 2 devices with mesh tensor=4: the batch is not split at all, so the
  processes cannot each feed their own rows; both refuse in one line before the workdir
  (and so any data or compile) is touched."""
  from tests.test_train import overrides
  args = overrides(corpus, tmp_path / "run") + ["--config.mesh.data=1",
                                                "--config.mesh.tensor=4"]
  ran = launch(["-m", "vesperjax.train", *args], tmp_path / "run", devices=2, processes=2)
  for code, _, err in ran:
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: the mesh {'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 4} "
                      "splits the batch into 1 shard(s), which 2 processes cannot share "
                      "evenly (each reads its own 1/2 of every batch): make mesh.data x "
                      "mesh.fsdp x mesh.expert a multiple of 2"], err[-3000:]
    assert "Traceback" not in err
  assert not (tmp_path / "run").exists()


def test_iterator_state_continues_under_another_process_count(tmp_path):
  """Two processes' saved positions move a one-process iterator to the same global
  batch (the next global batch equals the two hosts' next rows, stacked); positions
  that differ are refused in one line."""
  from tests.data.test_pipeline import make_cache
  from vesperjax.data import errors, pipeline, train_iterator
  cache = make_cache(tmp_path / "c", 16 * 60 + 5)
  hosts = [train_iterator(cache, 16, 4, seed=2, process_index=p, process_count=2)
           for p in range(2)]
  folder = tmp_path / "data"
  folder.mkdir()
  for p, it in enumerate(hosts):
    for _ in range(5):
      next(it)
    (folder / f"process_{p}-of-2.json").write_text(json.dumps(it.get_state()))
  assert pipeline.saved_by_other_process_count(str(folder), 0, 1)
  assert not pipeline.saved_by_other_process_count(str(folder), 1, 2)
  one = train_iterator(cache, 16, 4, seed=2, process_index=0, process_count=1)
  assert "saved by 2 process(es), this run has 1" in pipeline.restore_global_position(
      str(folder), one)
  for _ in range(3):
    np.testing.assert_array_equal(next(one), np.concatenate([next(h) for h in hosts]))
  (folder / "process_1-of-2.json").write_text(json.dumps({"next_index": 7}))
  with pytest.raises(errors.DataError, match="saved different data positions"):
    pipeline.restore_global_position(str(folder), one)


if __name__ == "__main__":
  worker()
