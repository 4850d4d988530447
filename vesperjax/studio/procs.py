"""Which process is a run's. A pid read from a run folder (its `.lock`, or the job file
of an earlier studio) is anyone's to write, so it is trusted only when /proc shows a
live process whose command line names that run folder as its --workdir, started when
the record says (when it says)."""
from __future__ import annotations

import os


def alive(pid) -> bool:
  if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def start_time(pid: int) -> int | None:
  """When process `pid` started, in clock ticks since boot (/proc/PID/stat's field 22):
  with the boot id, it tells a process apart from a later one given the same pid."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      stat = f.read()
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


def identity(pid: int) -> dict:
  """What a job file records of a process the studio started."""
  return dict(pid=pid, pid_start=start_time(pid), boot_id=boot_id())


def names_workdir(pid: int, workdir: str) -> bool:
  """Whether process `pid`'s command line has `--workdir` naming real folder `workdir`
  (a relative one is read from the process's working directory)."""
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      args = f.read().split(b"\0")
  except OSError:
    return False  # no /proc (or not ours to read): nothing to verify it by
  try:
    cwd = os.readlink(f"/proc/{pid}/cwd")
  except OSError:
    cwd = None
  for i, arg in enumerate(args):
    if arg == b"--workdir" and i + 1 < len(args):
      value = args[i + 1]
    elif arg.startswith(b"--workdir="):
      value = arg[len(b"--workdir="):]
    else:
      continue
    path = os.fsdecode(value)
    if not os.path.isabs(path):
      if cwd is None:
        continue
      path = os.path.join(cwd, path)
    if os.path.realpath(path) == workdir:
      return True
  return False


def is_runs_process(record: dict, workdir: str) -> bool:
  """Whether `record` ({pid, and pid_start / boot_id when a studio recorded them}, as
  read from a file) names a live process that is run `workdir`'s trainer or job."""
  pid = record.get("pid")
  if not alive(pid):
    return False
  if record.get("pid_start") is not None:
    if record.get("boot_id") not in (None, boot_id()):
      return False
    if start_time(pid) != record.get("pid_start"):
      return False  # the pid was given to another process since
  return names_workdir(pid, workdir)
