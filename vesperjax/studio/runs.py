"""Reading run directories: what `vesperjax.train` and `vesperjax.benchmark` write
(config.json, metrics.jsonl, checkpoints/, .lock, benchmark_report.json) and what the
studio's jobs add (studio_job.json, console.log). Nothing here writes."""
from __future__ import annotations

import json
import os
import socket

CONSOLE = "console.log"
JOB = "studio_job.json"
REPORT = "benchmark_report.json"
# exit statuses of a stopped job: the trainer's after SIGINT / SIGTERM (it saves first),
# or a process the signal ended before it could handle it (Popen's negative status)
STOPPED_BY_SIGNAL = (128 + 2, 128 + 15, -2, -15)


def read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


def read_lines(path: str, offset: int = 0) -> tuple[list[str], int]:
  """The complete lines of `path` from byte `offset`, and the offset after the last one
  (a line still being written is left for the next read)."""
  try:
    with open(path, "rb") as f:
      f.seek(offset)
      data = f.read()
  except OSError:
    return [], offset
  end = data.rfind(b"\n") + 1
  return data[:end].decode("utf-8", "replace").splitlines(), offset + end


def read_metrics(workdir: str, offset: int = 0) -> tuple[list[dict], int]:
  """metrics.jsonl's records from byte `offset` (malformed lines skipped)."""
  lines, end = read_lines(os.path.join(workdir, "metrics.jsonl"), offset)
  records = []
  for line in lines:
    try:
      r = json.loads(line)
    except ValueError:
      continue
    if isinstance(r, dict) and isinstance(r.get("step"), int):
      records.append(r)
  return records, end


def pid_alive(pid) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def trainer_pid(workdir: str) -> int | None:
  """The pid of the live trainer holding the run's lock on this host, if any."""
  holder = read_json(os.path.join(workdir, ".lock")) or {}
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and pid_alive(pid):
    return pid
  return None


def foreign_job_pid(workdir: str) -> int | None:
  """The pid of a studio job still running from an earlier studio (not our child)."""
  job = read_json(os.path.join(workdir, JOB)) or {}
  pid = job.get("pid")
  if job.get("exit_code") is not None or not pid_alive(pid):
    return None
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      mine = b"vesperjax" in f.read()
  except OSError:
    mine = False  # no /proc: the lock still tells a trainer apart
  return pid if mine else None


def checkpoints(workdir: str, kind: str = "checkpoints") -> list[int]:
  """The saved steps: `kind` "checkpoints" (the latest few) or "best" (the best one)."""
  root = os.path.join(workdir, kind)
  try:
    names = os.listdir(root)
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit() and
                os.path.isdir(os.path.join(root, n)))


def error_line(workdir: str) -> str | None:
  """The last `error:` line of the run's console log."""
  lines, _ = read_lines(os.path.join(workdir, CONSOLE))
  for line in reversed(lines):
    at = line.rfind("error: ")  # a progress bar left unfinished may precede it
    if at >= 0 and (at == 0 or not line[at - 1].isalnum()):
      return line[at:].strip()
  return None


# The runs table's metric columns: each run's last logged value of each.
LATEST_KEYS = ("step", "loss", "eval_loss", "tokens_per_s")


def update_latest(latest: dict, records: list[dict]) -> dict:
  """`latest` with the last value of each LATEST_KEYS key in `records` folded in."""
  for r in records:
    latest.update({k: r[k] for k in LATEST_KEYS if k in r})
  return latest


def summarize(workdir: str, name: str, job_alive: bool = False,
              latest: dict | None = None) -> dict:
  """One row of the runs table: kind, preset, optimizer, step / max steps, last losses,
  tokens/s and state (running, stopped, finished, failed). `latest`: the metric columns
  when the caller follows metrics.jsonl already (else it is read here)."""
  config = read_json(os.path.join(workdir, "config.json")) or {}
  job = read_json(os.path.join(workdir, JOB)) or {}
  report = os.path.exists(os.path.join(workdir, REPORT))
  kind = job.get("kind") or ("benchmark" if report else "train")
  optim, train = config.get("optim", {}), config.get("train", {})
  row = dict(name=name, kind=kind, preset=config.get("model", {}).get("preset"),
             optimizer=optim.get("name"), max_steps=train.get("max_steps"), step=None,
             loss=None, eval_loss=None, tokens_per_s=None, error=None,
             mtime=os.path.getmtime(workdir))
  if kind == "benchmark":
    row["optimizer"] = " vs ".join(job.get("arms", [])) or None
    row["max_steps"] = job.get("steps")
  if latest is None:
    latest = update_latest({}, read_metrics(workdir)[0])
  row.update(latest)
  running = job_alive or (trainer_pid(workdir) or foreign_job_pid(workdir)) is not None
  code = job.get("exit_code")
  if running:
    state = "running"
  elif code is not None and code != 0 and code not in STOPPED_BY_SIGNAL:
    state = "failed"
  elif kind == "benchmark":  # its report is rewritten after every run: ask the job
    state = "finished" if code == 0 or (code is None and report) else "stopped"
  elif row["step"] is not None and row["max_steps"] and row["step"] >= row["max_steps"]:
    state = "finished"
  else:
    state = "stopped"
  row["state"] = state
  if state == "failed":
    row["error"] = error_line(workdir) or f"exited with status {code}"
  return row


def list_runs(runs_root: str, alive: set[str] = frozenset()) -> list[dict]:
  """Every run directly under `runs_root`, newest first (`alive`: names of running jobs)."""
  rows = []
  try:
    names = sorted(os.listdir(runs_root))
  except OSError:
    return rows
  for name in names:
    path = os.path.join(runs_root, name)
    if name.startswith(".") or not os.path.isdir(path):
      continue
    if not any(os.path.exists(os.path.join(path, f)) for f in
               ("config.json", JOB, REPORT)):
      continue
    rows.append(summarize(path, name, job_alive=name in alive))
  rows.sort(key=lambda r: r["mtime"], reverse=True)
  return rows


def detail(workdir: str, name: str, job_alive: bool = False) -> dict:
  """A run's page: its row, config, checkpoints (with the best one) and job command."""
  row = summarize(workdir, name, job_alive)
  best = checkpoints(workdir, "best")
  job = read_json(os.path.join(workdir, JOB)) or {}
  return dict(row, config=read_json(os.path.join(workdir, "config.json")),
              model_config=read_json(os.path.join(workdir, "model_config.json")),
              checkpoints=checkpoints(workdir), best=best[-1] if best else None,
              command=job.get("argv"),
              has_report=os.path.exists(os.path.join(workdir, REPORT)),
              plots=sorted(f for f in _listdir(os.path.join(workdir, "plots"))
                           if f.endswith(".png")))


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []
