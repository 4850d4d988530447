"""vesperjax under a real SLURM scheduler, and launch environments it must refuse.

The `slurm` fixture starts a private one-node cluster (tests/slurm_cluster.py; it skips,
saying why, where SLURM cannot be installed or started). `examples/slurm/train.sbatch`
runs as a 2-task job, each task with 2 simulated CPU devices: `vesperjax.train` finds
its processes through SLURM's environment, each reads its own rows of every batch, and
the job checkpoints; a second job resumes it. Their losses must equal those of the same
run in one process with the same 4 devices in total.

The jobs run to max_steps 4, then 8: with `optim.min_lr_ratio=1` the LR after warmup is
constant, so the first job's steps are the 8-step run's first 4.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.slurm_cluster import Unavailable, start_cluster
from tests.test_resume_elsewhere import metrics
from tests.test_train import overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "examples", "slurm", "train.sbatch")
JOB_TIMEOUT_S = 400
# the file's GPU cluster layout, overridden for one node of CPUs
LOCAL = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
  """A running private cluster; stopped by PID at the end whatever happened."""
  try:
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
  except Unavailable as e:
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
      pytest.fail(f"CI=true but the SLURM tests would skip: {e}")  # tests/test_ci_coverage.py
    pytest.skip(f"no SLURM cluster: {e}")
  try:
    yield cluster
  finally:
    cluster.stop()


def train_args(corpus, workdir, max_steps: int) -> list[str]:
  args = [a for a in overrides(corpus, workdir) if not a.startswith("--workdir")]
  return args + [f"--workdir={workdir}", f"--config.train.max_steps={max_steps}",
                 "--config.train.eval_every=2", "--config.train.save_every=4",
                 "--config.train.log_every=1", "--config.optim.lr=3e-3",
                 "--config.optim.warmup_steps=2", "--config.optim.min_lr_ratio=1.0",
                 f"--config.data.cache_dir={os.path.dirname(workdir)}/cache"]


def job_env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "XLA_FLAGS", "JAX_PROCESS", "JAX_NUM_PROCESSES",
                              "JAX_COORDINATOR"))}
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def submit(cluster, args: list[str], output) -> tuple[str, str]:
  """sbatch the example file with `args`; waits for the job's end. (state, output)."""
  env = dict(job_env(2), SLURM_CONF=cluster.env["SLURM_CONF"])
  r = subprocess.run(["sbatch", "--parsable", *LOCAL, f"--output={output}", SBATCH, *args],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, f"sbatch failed: {r.stderr}"
  job = r.stdout.strip().split(";")[0]
  deadline, state = time.monotonic() + JOB_TIMEOUT_S, ""
  while time.monotonic() < deadline:  # polled: `sbatch --wait` sleeps up to 10 s a turn
    show = cluster.run("scontrol", "-o", "show", "job", job).stdout
    fields = dict(f.split("=", 1) for f in show.split() if "=" in f)
    state = fields.get("JobState", "")
    if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "PREEMPTED", "BOOT_FAIL", "DEADLINE"):
      return f"{state} {fields.get('ExitCode')}", open(output).read()
    time.sleep(0.5)
  cluster.run("scancel", job)
  raise AssertionError(f"job {job} still {state} after {JOB_TIMEOUT_S} s:\n"
                       f"{open(output).read()[-3000:] if os.path.exists(output) else ''}")


@pytest.fixture(scope="module")
def first_job(slurm, corpus, tmp_path_factory):
  """The uninterrupted one-process reference (8 steps, 4 devices) and the first job."""
  root = tmp_path_factory.mktemp("slurm-run")
  ref = str(root / "one-process")
  r = subprocess.run([sys.executable, "-m", "vesperjax.train", *train_args(corpus, ref, 8)],
                     env=job_env(4), cwd=ROOT, capture_output=True, text=True,
                     timeout=JOB_TIMEOUT_S)
  assert r.returncode == 0, r.stderr[-3000:]
  workdir = str(root / "slurm")
  state, out = submit(slurm, train_args(corpus, workdir, 4), root / "job1.out")
  return ref, workdir, state, out, root


def test_slurm_job_trains_like_one_process(first_job):
  ref, workdir, state, out, _ = first_job
  assert state == "COMPLETED 0:0", out[-3000:]
  assert "job " in out and ": 2 tasks on " in out
  assert "processes: 2 found through SLURM's environment" in out
  assert out.count("processes: ") == 1  # process 0's line only
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "4", "data"))) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  (a, ea), (b, eb) = metrics(workdir), metrics(ref)
  assert sorted(a) == [1, 2, 3, 4] and sorted(ea) == [2, 4]
  # each process read its own half of every batch: together, the one process's batches
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-5)
  np.testing.assert_allclose([ea[s] for s in ea], [eb[s] for s in ea], rtol=1e-5)


@pytest.mark.slow
def test_second_slurm_job_resumes_the_first(slurm, first_job, corpus):
  ref, workdir, state, _, root = first_job
  assert state == "COMPLETED 0:0"
  state, out = submit(slurm, train_args(corpus, workdir, 8), root / "job2.out")
  assert state == "COMPLETED 0:0", out[-3000:]
  assert "resumed from step 4" in out
  (a, ea), (b, eb) = metrics(workdir), metrics(ref)
  assert sorted(a) == sorted(b) == list(range(1, 9)) and sorted(ea) == [2, 4, 6, 8]
  np.testing.assert_allclose([a[s] for s in b], [b[s] for s in b], rtol=1e-5)
  np.testing.assert_allclose([ea[s] for s in eb], [eb[s] for s in eb], rtol=1e-5)


# -- launch environments refused in one line (no cluster needed) -----------------------
STEP = dict(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_STEP_NODELIST="node1",
            SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_STEP_NUM_TASKS="2")


@pytest.mark.parametrize("env,message", [
    ({k: v for k, v in STEP.items() if k != "SLURM_LOCALID"},
     "SLURM job step without SLURM_LOCALID"),
    (dict(STEP, SLURM_STEP_NUM_TASKS="1"), "job step of 1 task(s) in a job of SLURM_NTASKS=2"),
    (dict(STEP, SLURM_PROCID="2"), "SLURM_PROCID=2 is not in [0, SLURM_NTASKS=2)"),
    (dict(STEP, SLURM_NTASKS="two"), "SLURM_NTASKS='two' is not an integer"),
    (dict(SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0"),
     "this is its batch script (or salloc shell), not a job step: start the trainer "
     "with `srun"),
    (dict(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="0"),
     "without OMPI_MCA_orte_hnp_uri"),
    (dict(OMPI_MCA_orte_hnp_uri="1.0;tcp://10.0.0.1:1", OMPI_COMM_WORLD_SIZE="4"),
     "Open MPI launch without OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK"),
    (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2"), "JAX_PROCESS_ID missing"),
    (dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="2"),
     "JAX_PROCESS_ID=2 is not in [0, JAX_NUM_PROCESSES=2)"),
])
def test_half_set_launch_environment_is_refused(env, message):
  from vesperjax.distributed import check_launch_env
  with pytest.raises(ValueError, match=None) as e:
    check_launch_env(env)
  assert message in str(e.value)


@pytest.mark.parametrize("env", [
    {}, dict(STEP), dict(SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_PROCID="0"),
    dict(OMPI_MCA_orte_hnp_uri="1.0;tcp://10.0.0.1:1", OMPI_COMM_WORLD_SIZE="4",
         OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_LOCAL_RANK="3"),
    # explicit variables win over a scheduler's, even a half-set one
    dict(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1",
         SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0")])
def test_complete_launch_environment_is_accepted(env):
  from vesperjax.distributed import check_launch_env
  check_launch_env(env)


def test_trainer_in_a_batch_script_without_srun_is_one_error_line(corpus, tmp_path):
  """The trainer started in a 2-task job's batch script (srun forgotten): one line,
  exit 2, before the workdir or any device is touched."""
  env = dict(job_env(2), SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_PROCID="0",
             SLURM_LOCALID="0", SLURM_JOB_NODELIST="node1")
  r = subprocess.run([sys.executable, "-m", "vesperjax.train",
                      *train_args(corpus, str(tmp_path / "run"), 2)],
                     env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr[-2000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "not a job step" in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "run").exists()


def test_cluster_that_cannot_be_installed_says_why(monkeypatch, tmp_path):
  """Where SLURM is missing and cannot be installed the fixture skips with the reason
  (never a silent pass): not root, or no apt-get."""
  from tests import slurm_cluster
  monkeypatch.setattr(slurm_cluster.shutil, "which", lambda name, **kw: None)
  monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
  with pytest.raises(Unavailable, match="installing slurm-wlm munge needs root"):
    start_cluster(tmp_path / "c")
  monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 0)
  with pytest.raises(Unavailable, match="not installed and there is no apt-get"):
    start_cluster(tmp_path / "c")
  assert not (tmp_path / "c").exists()
