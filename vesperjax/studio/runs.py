"""Reading run directories: what `vesperjax.train` and `vesperjax.benchmark` write
(config.json, metrics.jsonl, checkpoints/, .lock, benchmark_report.json) and what the
studio's jobs add (studio_job.json, console.log). Nothing here writes.

A run folder's files are data from whoever can write there: each is opened through
`safe_files` (a link leading out of the run folder reads as missing), and values are
type-checked before use, so a crafted file shows as a broken run, never an error page."""
from __future__ import annotations

import json
import math
import os
import socket

from vesperjax.studio import procs, safe_files
from vesperjax.training import metrics_log
from vesperjax.studio.paths import BadRequest, run_dir

CONSOLE = "console.log"
JOB = "studio_job.json"
REPORT = "benchmark_report.json"
LOCK = ".lock"
MAX_JSON = 16 << 20  # a larger JSON file in a run folder reads as unreadable
ERROR_TAIL = 64 << 10  # how much of the console's end `error_line` looks at
# exit statuses of a stopped job: the trainer's after SIGINT / SIGTERM (it saves first),
# or a process the signal ended before it could handle it (Popen's negative status)
STOPPED_BY_SIGNAL = (128 + 2, 128 + 15, -2, -15)


def parse_json(text):
  """json.loads, with nesting too deep for the parser a ValueError like any bad JSON."""
  try:
    return json.loads(text)
  except RecursionError:
    raise ValueError("JSON nested too deeply") from None


def read_json(workdir: str, rel: str) -> dict | None:
  """The JSON object in `rel` under `workdir`, or None (missing, unreadable, not an
  object, too large, or a link leading out of the run folder)."""
  try:
    data = safe_files.read_bytes(workdir, rel, limit=MAX_JSON + 1)
    out = parse_json(data) if len(data) <= MAX_JSON else None
  except (OSError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def read_lines(workdir: str, rel: str, offset: int = 0,
               limit: int | None = None) -> tuple[list[str], int]:
  """The complete lines of `rel` under `workdir` from byte `offset` (at most `limit`
  bytes of them, when given: call again for the rest), and the offset after the last
  one (a line still being written is left for the next read)."""
  try:
    data = safe_files.read_bytes(workdir, rel, offset, limit)
  except OSError:
    return [], offset
  end = data.rfind(b"\n") + 1
  if end == 0 and limit is not None and len(data) >= limit:
    return [], offset + len(data)  # a line over `limit`: the next read takes its tail
  return data[:end].decode("utf-8", "replace").splitlines(), offset + end


def read_metrics(workdir: str, offset: int = 0,
                 limit: int | None = None) -> tuple[list[dict], int]:
  """metrics.jsonl's records from byte `offset` (`metrics_log.parse_records`: malformed
  lines skipped, non-finite values None) and the offset after them."""
  lines, end = read_lines(workdir, metrics_log.FILE, offset, limit)
  return metrics_log.parse_records(lines), end


def metrics_replaced(workdir: str, followed: tuple[int, int] | None,
                     offset: int) -> tuple[bool, tuple[int, int] | None]:
  """(whether metrics.jsonl is no longer the file read up to `offset`, its current
  (device, inode)): a resumed run rewrites it (`metrics_log.prepare_for_append`)."""
  found = safe_files.identity(workdir, metrics_log.FILE)
  if found is None:
    return False, followed
  now = found[:2]
  return (followed is not None and now != followed) or found[2] < offset, now


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _number(x):
  """`x` when it is a finite number, else None (a file may hold anything)."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return None
  return x if math.isfinite(x) else None


def _mtime(path: str) -> float:
  try:
    return os.path.getmtime(path)
  except OSError:  # removed while the table was being read
    return 0.0


def _section(d: dict, key: str) -> dict:
  value = d.get(key)
  return value if isinstance(value, dict) else {}


def lock_holder(workdir: str) -> dict | None:
  """The run's `.lock` record when it names a live process on this host."""
  holder = read_json(workdir, LOCK) or {}
  if holder.get("host") == socket.gethostname() and procs.alive(holder.get("pid")):
    return holder
  return None


def trainer_pid(workdir: str) -> int | None:
  """The pid of the live trainer holding the run's lock on this host, if any (for the
  state shown: Stop checks the process is the run's before signalling it)."""
  holder = lock_holder(workdir)
  return holder["pid"] if holder else None


def foreign_job_pid(workdir: str) -> int | None:
  """The pid of a studio job still running from an earlier studio (not our child): the
  job file's pid, when that process is verifiably this run's."""
  job = read_json(workdir, JOB) or {}
  if job.get("exit_code") is not None or not procs.is_runs_process(job, workdir):
    return None
  return job["pid"]


def refuse_links_out(workdir: str) -> None:
  """A 409 when the run folder holds a link leading out of it: for what hands the folder
  to code that follows links (the trainer on Resume, the model loader for Chat)."""
  try:
    link = safe_files.links_leading_out(workdir, [workdir])
  except safe_files.TooManyFiles as e:
    raise BadRequest(str(e), status=409) from None
  if link is not None:
    raise BadRequest(f"{link} is a link leading out of the run folder; remove it",
                     status=409)


def checkpoints(workdir: str, kind: str = "checkpoints") -> list[int]:
  """The saved steps: `kind` "checkpoints" (the latest few) or "best" (the best one)."""
  return sorted(int(n) for n, is_dir in safe_files.entries(workdir, kind)
                if is_dir and n.isascii() and n.isdigit())


def error_line(workdir: str) -> str | None:
  """The last `error:` line of the run's console log."""
  try:
    tail = safe_files.tail_bytes(workdir, CONSOLE, ERROR_TAIL)
  except OSError:
    return None
  for line in reversed(tail.decode("utf-8", "replace").splitlines()):
    at = line.rfind("error: ")  # a progress bar left unfinished may precede it
    if at >= 0 and (at == 0 or not line[at - 1].isalnum()):
      return line[at:].strip()[:1000]
  return None


# The runs table's metric columns: each run's last logged value of each.
LATEST_KEYS = ("step", "loss", "eval_loss", "tokens_per_s")


def update_latest(latest: dict, records: list[dict]) -> dict:
  """`latest` with the last value of each LATEST_KEYS key in `records` folded in."""
  for r in records:
    latest.update({k: _number(r[k]) for k in LATEST_KEYS if k in r})
  return latest


def summarize(workdir: str, name: str, job_alive: bool = False,
              latest: dict | None = None) -> dict:
  """One row of the runs table: kind, preset, optimizer, step / max steps, last losses,
  tokens/s and state (running, stopped, finished, failed). `latest`: the metric columns
  when the caller follows metrics.jsonl already (else it is read here)."""
  config = read_json(workdir, "config.json") or {}
  job = read_json(workdir, JOB) or {}
  report = os.path.lexists(os.path.join(workdir, REPORT))
  kind = job.get("kind") if job.get("kind") in ("train", "benchmark") else (
      "benchmark" if report else "train")
  optim, train = _section(config, "optim"), _section(config, "train")
  preset, optimizer = _section(config, "model").get("preset"), optim.get("name")
  row = dict(name=name, kind=kind, preset=preset if isinstance(preset, str) else None,
             optimizer=optimizer if isinstance(optimizer, str) else None,
             max_steps=_number(train.get("max_steps")), step=None, loss=None,
             eval_loss=None, tokens_per_s=None, error=None, mtime=_mtime(workdir))
  if kind == "benchmark":
    arms = job.get("arms")
    ok = isinstance(arms, list) and all(isinstance(a, str) for a in arms)
    row["optimizer"] = " vs ".join(arms) if ok and arms else None
    row["max_steps"] = _number(job.get("steps"))
  if latest is None:
    latest = update_latest({}, read_metrics(workdir)[0])
  row.update(latest)
  running = job_alive or (trainer_pid(workdir) or foreign_job_pid(workdir)) is not None
  code = job.get("exit_code")
  code = code if _is_int(code) else None
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
  """Every run directly under `runs_root`, newest first (`alive`: names of running jobs);
  a name the detail page would refuse (a link leading out of --runs) is left out."""
  rows = []
  try:
    names = sorted(os.listdir(runs_root))
  except OSError:
    return rows
  for name in names:
    if name.startswith("."):
      continue
    try:
      path = run_dir(runs_root, name)
    except BadRequest:
      continue
    if not any(os.path.lexists(os.path.join(path, f)) for f in
               ("config.json", JOB, REPORT)):
      continue
    rows.append(summarize(path, name, job_alive=name in alive))
  rows.sort(key=lambda r: r["mtime"], reverse=True)
  return rows


def detail(workdir: str, name: str, job_alive: bool = False) -> dict:
  """A run's page: its row, config, checkpoints (with the best one) and job command."""
  row = summarize(workdir, name, job_alive)
  best = checkpoints(workdir, "best")
  job = read_json(workdir, JOB) or {}
  argv = job.get("argv")
  return dict(row, config=read_json(workdir, "config.json"),
              model_config=read_json(workdir, "model_config.json"),
              checkpoints=checkpoints(workdir), best=best[-1] if best else None,
              command=argv if isinstance(argv, list) and all(
                  isinstance(a, str) for a in argv) else None,
              has_report=os.path.lexists(os.path.join(workdir, REPORT)),
              plots=sorted(f for f, is_dir in safe_files.entries(workdir, "plots")
                           if not is_dir and f.endswith(".png")))
