"""kill -9 while a checkpoint is being written: the next run resumes from the last complete
checkpoint, to the losses of an uninterrupted run, and the half-written one is gone."""
import glob
import os
import signal
import subprocess
import sys
import time

from tests.test_train import ROOT, cli, corpus, losses, overrides  # noqa: F401


def _args(corpus, work, cache):  # noqa: F811
  return [*overrides(corpus, work), "--config.train.max_steps=8",
          "--config.train.save_every=1", "--config.train.log_every=1",
          "--config.train.eval_every=100", f"--config.data.cache_dir={cache}"]


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(corpus, tmp_path):  # noqa: F811
  work, cache = tmp_path / "run", tmp_path / "cache"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen([sys.executable, "-m", "vesperjax.train",
                           *_args(corpus, work, cache)], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  killed, deadline = None, time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    partial = glob.glob(str(work / "checkpoints" / "*.orbax-checkpoint-tmp"))
    if partial and int(os.path.basename(partial[0]).split(".")[0]) >= 3:
      proc.send_signal(signal.SIGKILL)  # orbax is writing this step right now
      killed = int(os.path.basename(partial[0]).split(".")[0])
      break
    time.sleep(0.001)
  proc.wait()
  assert killed is not None, "no save was caught in progress"
  complete = sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
  assert complete, os.listdir(work / "checkpoints")  # (the killed save may just have ended)

  resumed = cli(*_args(corpus, work, cache))
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {complete[-1]}" in resumed.stderr
  assert not glob.glob(str(work / "checkpoints" / "*.orbax-checkpoint-tmp"))
  reference = cli(*_args(corpus, tmp_path / "reference", cache))
  assert reference.returncode == 0, reference.stderr
  want, got = losses(tmp_path / "reference"), losses(work)
  assert all(got[s] == want[s] for s in range(complete[-1] + 1, 9)), (got, want)
