"""One trainer per run directory: an advisory lock on WORKDIR/.lock.

The lock is a `flock` on the file, so the kernel releases it when its holder dies (kill -9
included): a lock left behind by a dead process is taken over, and the run says whose it
was. The file records the holder (pid, host, start time) so that a refused trainer can
name it. A multi-process job holds one lock: process 0 takes it and tells the others.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live trainer holds the run directory (one-line message naming it)."""


def describe_holder(holder: dict) -> str:
  """'pid P on HOST (started T)' from a lock file's record."""
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
          f"(started {when})")


class WorkdirLock:
  """`with WorkdirLock(workdir):` or `acquire()` / `release()`; re-entrant per object."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None
    self.previous: dict | None = None  # the dead holder whose lock was taken over

  def _read(self, fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
      return json.loads(os.read(fd, 4096).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
      return {}

  def acquire(self) -> "WorkdirLock":
    if self._fd is not None:
      return self
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd)
      os.close(fd)
      raise WorkdirBusy(f"{os.path.dirname(self.path)} is in use by another trainer, "
                        f"{describe_holder(holder)}; wait for it, stop it, or use another "
                        "--workdir") from None
    previous = self._read(fd)
    if previous.get("pid") and previous.get("pid") != os.getpid():
      self.previous = previous
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(me).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # no holder recorded: nothing stale to report later
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def acquire_for_job(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the lock for the whole job; every process raises WorkdirBusy when it
  is held. Returns the lock on process 0 (None on the others)."""
  import jax  # pylint: disable=g-import-not-at-top
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir).acquire()
    except WorkdirBusy as e:
      error = str(e)
  if jax.process_count() > 1:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    busy = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if int(busy) and not error:
      error = f"{workdir} is in use by another trainer (see process 0's message)"
  if error:
    raise WorkdirBusy(error)
  return lock
