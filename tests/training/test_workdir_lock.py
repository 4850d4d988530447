"""One trainer per workdir: the lock refuses a second holder and outlives no process."""
import json
import os
import signal
import subprocess
import sys

import pytest

from vesperjax.training.workdir_lock import LOCK_NAME, WorkdirBusy, WorkdirLock


def test_second_holder_is_refused_until_release(tmp_path):
  first = WorkdirLock(str(tmp_path)).acquire()
  record = json.loads((tmp_path / LOCK_NAME).read_text())
  assert record["pid"] == os.getpid() and record["host"]
  with pytest.raises(WorkdirBusy, match=f"in use by another trainer, pid {os.getpid()} on"):
    WorkdirLock(str(tmp_path)).acquire()
  first.release()
  with WorkdirLock(str(tmp_path)) as again:
    assert again.previous is None  # a clean release leaves no holder behind


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  code = ("import os, signal, sys; from vesperjax.training.workdir_lock import WorkdirLock; "
          f"WorkdirLock({str(tmp_path)!r}).acquire(); print(os.getpid(), flush=True); "
          "os.kill(os.getpid(), signal.SIGKILL)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode == -signal.SIGKILL
  dead = int(r.stdout.split()[-1])
  lock = WorkdirLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's flock
  assert lock.previous["pid"] == dead
  assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
  lock.release()
