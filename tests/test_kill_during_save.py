"""kill -9 while a checkpoint is being written: the next run resumes from the last complete
checkpoint, to the losses of an uninterrupted run, and the half-written one is gone.

The trainer runs in a child whose data-iterator checkpoint writer (grain's handler, one
item of each Orbax save) stops inside the save of step HOLD, after writing a marker: the
kill lands while that save is provably in progress, not when 1 ms polling happens to
catch one."""
import os
import re
import signal
import subprocess
import sys
import time

from tests.test_train import ROOT, cli, losses, overrides

HOLD = 3  # the step whose save is held open and killed
TMP = ".orbax-checkpoint-tmp"

# The trainer's CLI, with grain's checkpoint writer held inside the save of step HOLD.
CHILD = r"""
import os, re, runpy, sys, time
import grain
handler = grain.checkpoint.CheckpointHandler
write = handler.save
def held_save(self, directory, *args, **kwargs):
  found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(directory))
  if found and int(found.group(1)) == int(os.environ["VJ_TEST_HOLD_STEP"]):
    marker = os.environ["VJ_TEST_HOLD_MARKER"]
    with open(marker + ".tmp", "w") as f:
      f.write(str(directory))
    os.replace(marker + ".tmp", marker)
    time.sleep(600)  # killed here
  return write(self, directory, *args, **kwargs)
handler.save = held_save
sys.argv = ["vesperjax.train", *sys.argv[1:]]
runpy.run_module("vesperjax.train", run_name="__main__", alter_sys=True)
"""


def _args(corpus, work, cache):
  return [*overrides(corpus, work), "--config.train.max_steps=8",
          "--config.train.save_every=1", "--config.train.log_every=1",
          "--config.train.eval_every=100", f"--config.data.cache_dir={cache}"]


def _complete(work):
  return sorted(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(corpus, tmp_path):
  work, cache, marker = tmp_path / "run", tmp_path / "cache", tmp_path / "holding"
  env = dict(os.environ, JAX_PLATFORMS="cpu", VJ_TEST_HOLD_STEP=str(HOLD),
             VJ_TEST_HOLD_MARKER=str(marker))
  env.pop("XLA_FLAGS", None)
  log = open(tmp_path / "child.log", "w")
  proc = subprocess.Popen([sys.executable, "-c", CHILD, *_args(corpus, work, cache)],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.1)
    assert marker.exists(), ("the save of step 3 was never reached",
                             open(tmp_path / "child.log").read()[-3000:])
    # the save is in progress: its temporary directory is there, the step is not complete
    held = marker.read_text()
    assert re.search(rf"/checkpoints/{HOLD}\{TMP}/", held), held
    assert (work / "checkpoints" / f"{HOLD}{TMP}").is_dir(), os.listdir(work / "checkpoints")
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    proc.kill()
    log.close()
  complete = _complete(work)
  assert HOLD not in complete and complete and complete[-1] == HOLD - 1, complete
  assert (work / "checkpoints" / f"{HOLD}{TMP}").is_dir()  # the partial save is left

  resumed = cli(*_args(corpus, work, cache))
  assert resumed.returncode == 0, resumed.stderr
  assert f"resumed from step {HOLD - 1}" in resumed.stderr
  assert not [d for d in os.listdir(work / "checkpoints") if d.endswith(TMP)]
  assert _complete(work) == [6, 7, 8]  # keep_checkpoints=3 whole ones, nothing partial
  reference = cli(*_args(corpus, tmp_path / "reference", cache))
  assert reference.returncode == 0, reference.stderr
  want, got = losses(tmp_path / "reference"), losses(work)
  assert sorted(got) == list(range(1, 9)), got
  assert all(got[s] == want[s] for s in range(HOLD, 9)), (got, want)
