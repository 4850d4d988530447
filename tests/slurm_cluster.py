"""A private one-node SLURM cluster for tests (the `slurm` fixture of tests/test_slurm.py).

`start_cluster(folder)` installs `slurm-wlm` and `munge` with apt-get when they are
missing (as root), then starts its own munged (own key and socket), slurmctld and slurmd
on free ports, with every state, spool, log and PID file inside `folder`; nothing in
/etc is read or changed, so a system SLURM or munge on the machine is left alone.
`Cluster.stop()` cancels its jobs, kills what is left of their steps and stops the three
daemons by PID: only what this module started. Where SLURM cannot be installed or
started, `start_cluster` raises `Unavailable` with the reason (the fixture skips with it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
START_TIMEOUT_S = 60


class Unavailable(RuntimeError):
  """SLURM cannot run here; the message says why."""


def _missing() -> list[str]:
  return [b for b in DAEMONS + CLIENTS if shutil.which(b) is None]


def ensure_installed() -> None:
  """apt-get install the packages when a binary is missing; Unavailable if that cannot
  happen (not root, no apt-get, no network, a failed install)."""
  if not _missing():
    return
  if os.geteuid() != 0:
    raise Unavailable(f"{', '.join(_missing())} not installed, and installing "
                      f"{' '.join(PACKAGES)} needs root")
  if shutil.which("apt-get") is None:
    raise Unavailable(f"{', '.join(_missing())} not installed and there is no apt-get")
  env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
  install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
  out = None
  for cmd in (install, ["apt-get", "update"], install):  # update only when needed
    try:
      out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
      raise Unavailable(f"`{' '.join(cmd)}` took over 10 minutes (no network?)") from None
    if out.returncode == 0 and cmd is install and not _missing():
      return
  last = (out.stderr or out.stdout).strip().splitlines()[-1:] if out else []
  raise Unavailable(f"`{' '.join(install)}` failed ({' '.join(last) or 'no output'})")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def slurm_conf(folder: Path, host: str, cpus: int, munge_socket: Path) -> str:
  """The cluster's slurm.conf: root runs everything, no cgroups, no accounting."""
  p = lambda name: folder / name  # noqa: E731
  return "\n".join([
      "ClusterName=vesperjax-test",
      f"SlurmctldHost={host}(127.0.0.1)",
      f"SlurmctldPort={free_port()}",
      f"SlurmdPort={free_port()}",
      "SlurmUser=root", "SlurmdUser=root",
      "AuthType=auth/munge", "CredType=cred/munge",
      f"AuthInfo=socket={munge_socket}",
      "ProctrackType=proctrack/linuxproc",  # containers lack a writable cgroup tree
      "TaskPlugin=task/none",
      "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
      "SchedulerType=sched/backfill", "MpiDefault=none", "SwitchType=switch/none",
      "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
      "JobAcctGatherType=jobacct_gather/none",
      "ReturnToService=2", "MailProg=/bin/true", "KillWait=5",
      f"StateSaveLocation={p('state')}", f"SlurmdSpoolDir={p('spool')}",
      f"SlurmctldPidFile={p('slurmctld.pid')}", f"SlurmdPidFile={p('slurmd.pid')}",
      f"SlurmctldLogFile={p('slurmctld.log')}", f"SlurmdLogFile={p('slurmd.log')}",
      f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN",
      f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP",
      ""])


class Cluster:
  """A running private cluster: `env` (SLURM_CONF set) for its client commands."""

  def __init__(self, folder: Path):
    self.folder = folder
    self.conf = folder / "slurm.conf"
    self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    self.env["SLURM_CONF"] = str(self.conf)
    self.daemons: list[subprocess.Popen] = []

  def _start(self, name: str, cmd: list[str]) -> None:
    log = open(self.folder / f"{name}.out", "w")
    self.daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd=self.folder,
                                         start_new_session=True))

  def log_tail(self, lines: int = 8) -> str:
    out = []
    for name in ("munged.log", "munged.out", "slurmctld.log", "slurmctld.out",
                 "slurmd.log", "slurmd.out"):
      path = self.folder / name
      if path.exists() and path.stat().st_size:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
        out.append(f"--- {name}\n" + "\n".join(text))
    return "\n".join(out)

  def run(self, *cmd: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                          timeout=timeout, **kw)

  def wait_idle(self, timeout: float) -> None:
    """Until the node reports idle; Unavailable with the daemons' logs otherwise."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
      dead = [p.args[0] for p in self.daemons if p.poll() is not None]
      if dead:
        raise Unavailable(f"{', '.join(dead)} exited at start:\n{self.log_tail()}")
      try:
        state = self.run("sinfo", "-h", "-o", "%T", timeout=10).stdout.strip()
      except subprocess.TimeoutExpired:
        state = "(sinfo timed out)"
      if state == "idle":
        return
      time.sleep(0.5)
    raise Unavailable(f"the node is not idle after {timeout:.0f} s (sinfo: {state!r}):\n"
                      f"{self.log_tail()}")

  def ours(self) -> list[int]:
    """PIDs (besides the daemons) whose environment names this cluster's slurm.conf:
    job steps, slurmstepd and the programs they started."""
    marker = f"SLURM_CONF={self.conf}".encode()
    daemons = {p.pid for p in self.daemons}
    found = []
    for entry in os.listdir("/proc"):
      if not entry.isdigit() or int(entry) in daemons or int(entry) == os.getpid():
        continue
      try:
        if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
          found.append(int(entry))
      except OSError:  # gone, or not ours to read
        continue
    return found

  def stop(self) -> None:
    """Cancel the jobs, kill their leftover steps, stop the daemons (all by PID)."""
    try:
      if any(p.args[0] == "slurmctld" and p.poll() is None for p in self.daemons):
        self.run("scancel", "--full", "--partition=test", timeout=15)
        time.sleep(1)
    except (OSError, subprocess.TimeoutExpired):
      pass
    finally:
      for p in reversed(self.daemons):  # slurmd, slurmctld, then munged
        if p.poll() is None:
          start = time.monotonic()
          p.terminate()
          try:
            p.wait(timeout=10)
          except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
          with open(self.folder / "stop.log", "a") as f:  # what a slow teardown waited on
            f.write(f"{p.args[0]} stopped in {time.monotonic() - start:.1f} s\n")
      for pid in self.ours():  # slurmstepd outlives slurmd by design
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass


def start_cluster(folder: Path) -> Cluster:
  """A private cluster running in `folder` (created); Unavailable when it cannot."""
  ensure_installed()
  if os.geteuid() != 0:  # SlurmUser=root and munged's key checks
    raise Unavailable("a private SLURM cluster runs its daemons as root; not root here")
  folder.mkdir(parents=True, exist_ok=True)
  folder.chmod(0o700)  # munged refuses a key or socket in a folder others may write to
  for sub in ("state", "spool"):
    (folder / sub).mkdir(exist_ok=True)
  key = folder / "munge.key"
  key.write_bytes(os.urandom(1024))
  key.chmod(0o400)
  munge_socket = folder / "munge.socket"
  host = socket.gethostname().split(".")[0]
  cluster = Cluster(folder)
  cluster.conf.write_text(slurm_conf(folder, host, os.cpu_count() or 1, munge_socket))
  try:
    cluster._start("munged", [
        "munged", "--foreground", "--force", f"--socket={munge_socket}",
        f"--key-file={key}", f"--pid-file={folder / 'munged.pid'}",
        f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}"])
    deadline = time.monotonic() + 10
    while not munge_socket.exists() and time.monotonic() < deadline:
      if cluster.daemons[0].poll() is not None:
        raise Unavailable(f"munged exited at start:\n{cluster.log_tail()}")
      time.sleep(0.1)
    cluster._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
    cluster._start("slurmd", ["slurmd", "-D", "-N", host, "-f", str(cluster.conf)])
    cluster.wait_idle(START_TIMEOUT_S)
  except BaseException:
    cluster.stop()
    raise
  return cluster
