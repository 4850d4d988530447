"""Training and benchmark jobs: child processes started from validated, typed form
values (an argv list, never a shell string). Each runs in its own session, so closing
the browser or stopping the studio leaves it running; its output goes to the run's
console.log and its command and exit status to studio_job.json."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from vesperjax.studio import runs
from vesperjax.studio.paths import BadRequest, data_file, run_dir

CONFIG_PY = "studio_config.py"
CONFIG_JSON = "studio_config.json"
TOKENIZER = re.compile(r"byte|bpe:[0-9]{3,6}")
# The config file a job's command names: the run's config, from the JSON beside it.
_LOADER = '''"""Written by vesperjax.studio: this run's config, read from {json!r}."""
import json

from vesperjax.run_config import RunConfig


def get_config():
  with open({path!r}) as f:
    return RunConfig.from_dict(json.load(f), ignore_unknown=True).to_config_dict()
'''


def _int(form: dict, key: str, lo: int, hi: int, default=None) -> int:
  value = form.get(key, default)
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
    raise BadRequest(f"{key}: give a whole number from {lo} to {hi}")
  return value


def _float(value, key: str) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise BadRequest(f"{key}: {value!r} is not a number") from None
  if not (x > 0 and x < 1):
    raise BadRequest(f"{key}: {value!r} must be a positive number below 1")
  return x


def _choice(form: dict, key: str, choices, default=None) -> str:
  value = form.get(key, default)
  if value not in choices:
    raise BadRequest(f"{key}: {value!r} is not one of {', '.join(choices)}")
  return value


class Jobs:
  """Starts, watches and stops the studio's jobs; at most `max_jobs` at once."""

  def __init__(self, runs_root: str, data_roots: list[str], max_jobs: int = 2):
    self.runs_root, self.data_roots, self.max_jobs = runs_root, data_roots, max_jobs
    self.procs: dict[str, subprocess.Popen] = {}

  # -- watching ----------------------------------------------------------------------
  def poll(self) -> set[str]:
    """Reap finished children (recording their exit status); the names still running."""
    for name, proc in list(self.procs.items()):
      code = proc.poll()
      if code is None:
        continue
      del self.procs[name]
      workdir = run_dir(self.runs_root, name)
      job = runs.read_json(os.path.join(workdir, runs.JOB)) or {}
      if job.get("pid") == proc.pid:
        _write_json(os.path.join(workdir, runs.JOB),
                    dict(job, exit_code=code, finished=time.time()))
    return set(self.procs)

  def running(self, name: str) -> int | None:
    """The pid of run `name`'s live process (a job of ours, or a trainer from elsewhere
    holding the run's lock), if any."""
    if name in self.poll():
      return self.procs[name].pid
    workdir = run_dir(self.runs_root, name)
    return runs.trainer_pid(workdir) or runs.foreign_job_pid(workdir)

  # -- starting ----------------------------------------------------------------------
  def _check_capacity(self) -> None:
    if len(self.poll()) >= self.max_jobs:
      raise BadRequest(f"{self.max_jobs} job(s) running, the limit (--max-jobs); stop one "
                       "or wait for it", status=409)

  def _run_config(self, form: dict, steps: int) -> dict:
    """The typed, validated run config of a form (a BadRequest naming the bad field)."""
    from vesperjax.config import PRESET_NAMES
    from vesperjax.run_config import ModelOverrides, RunConfig, model_config, validate
    preset = _choice(form, "preset", PRESET_NAMES, "tiny")
    dataset = form.get("dataset") or "stdlib"
    if dataset != "stdlib":
      dataset = data_file(self.data_roots, dataset)
    tokenizer = form.get("tokenizer") or "bpe:8192"
    if not isinstance(tokenizer, str) or not TOKENIZER.fullmatch(tokenizer):
      raise BadRequest(f"tokenizer: {tokenizer!r}: use byte or bpe:N (e.g. bpe:8192)")
    model = form.get("model") or {}
    if not isinstance(model, dict):
      raise BadRequest("model: give overrides as {field: value}")
    d = RunConfig(model=ModelOverrides(preset=preset)).to_dict()
    d["model"].update(model)
    d["data"].update(dataset=dataset, tokenizer=tokenizer,
                     seq_len=_int(form, "seq_len", 8, 1 << 16, 256))
    d["train"].update(max_steps=steps, batch_size=_int(form, "batch_size", 1, 4096, 8),
                      eval_every=min(200, steps), save_every=min(500, steps),
                      log_every=max(1, min(10, steps // 20)))
    d["optim"].update(lr=_float(form.get("lr", 5e-4), "lr"),
                      warmup_steps=min(100, steps // 10))
    if form.get("optimizer") is not None:
      d["optim"]["name"] = _choice(form, "optimizer", ("velvet", "adamw"))
    try:
      run = validate(RunConfig.from_dict(d))
      model_config(run)  # the model's own rules (a layer count, head sizes, ...)
    except (TypeError, ValueError) as e:
      raise BadRequest(str(e).splitlines()[0]) from None
    return run.to_dict()

  def _new_run(self, form: dict) -> tuple[str, str]:
    name = form.get("name")
    workdir = run_dir(self.runs_root, name, must_exist=False)
    if os.path.exists(workdir):
      raise BadRequest(f"a run named {name!r} exists; choose another name", status=409)
    return name, workdir

  def start_train(self, form: dict) -> str:
    """A new training run from the New run form; returns its name."""
    self._check_capacity()
    name, workdir = self._new_run(form)
    config = self._run_config(form, _int(form, "steps", 1, 10_000_000))
    os.makedirs(workdir)
    cfg = _write_config(workdir, config)
    self._spawn(name, workdir, dict(kind="train"), ["-m", "vesperjax.train", "--config",
                                                    cfg, "--workdir", workdir])
    return name

  def start_benchmark(self, form: dict) -> str:
    """A Velvet-vs-AdamW benchmark (`vesperjax.benchmark optimizers`); returns its name."""
    from vesperjax.bench.optimizers import ARMS
    self._check_capacity()
    name, workdir = self._new_run(form)
    steps = _int(form, "steps", 1, 1_000_000)
    config = self._run_config(form, steps)
    arms = form.get("arms") or ["velvet", "adamw"]
    if not isinstance(arms, list) or not arms or any(a not in ARMS for a in arms):
      raise BadRequest(f"arms: choose from {', '.join(ARMS)}")
    lrs = form.get("lrs") or [config["optim"]["lr"]]
    if not isinstance(lrs, list) or not 1 <= len(lrs) <= 12:
      raise BadRequest("lrs: give 1 to 12 learning rates")
    lrs = [_float(x, "lrs") for x in lrs]
    seeds = _int(form, "seeds", 1, 16, 1)
    os.makedirs(workdir)
    cfg = _write_config(workdir, config)
    argv = ["-m", "vesperjax.benchmark", "optimizers", "--config", cfg, "--workdir",
            workdir, "--steps", str(steps), "--seeds", str(seeds), "--lrs",
            ",".join(repr(x) for x in lrs), "--optimizers", ",".join(dict.fromkeys(arms))]
    self._spawn(name, workdir, dict(kind="benchmark", arms=list(dict.fromkeys(arms)),
                                    steps=steps), argv)
    return name

  def resume(self, name: str) -> None:
    """Train run `name` on from its latest checkpoint, or rerun its benchmark command
    (which keeps the finished runs)."""
    workdir = run_dir(self.runs_root, name)
    if self.running(name):
      raise BadRequest(f"run {name!r} is running", status=409)
    self._check_capacity()
    job = runs.read_json(os.path.join(workdir, runs.JOB)) or {}
    if job.get("kind") == "benchmark":
      self._spawn(name, workdir, {k: job[k] for k in ("kind", "arms", "steps")},
                  job["argv"][1:])
      return
    if not runs.checkpoints(workdir):
      raise BadRequest(f"run {name!r} has no checkpoint to resume from", status=409)
    config = runs.read_json(os.path.join(workdir, "config.json"))
    if config is None:
      raise BadRequest(f"run {name!r} has no readable config.json", status=409)
    cfg = _write_config(workdir, config)
    self._spawn(name, workdir, dict(kind="train"), ["-m", "vesperjax.train", "--config",
                                                    cfg, "--workdir", workdir, "--resume"])

  def _spawn(self, name: str, workdir: str, job: dict, args: list[str]) -> None:
    argv = [sys.executable, *args]
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                        os.environ.get("PYTHONPATH")])))
    with open(os.path.join(workdir, runs.CONSOLE), "ab") as console:
      console.write(f"$ {' '.join(argv)}\n".encode())
      console.flush()
      proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=workdir, env=env,
                              start_new_session=True)
    self.procs[name] = proc
    _write_json(os.path.join(workdir, runs.JOB),
                dict(job, argv=argv, pid=proc.pid, started=time.time(), exit_code=None))

  # -- stopping ----------------------------------------------------------------------
  def stop(self, name: str) -> int:
    """SIGTERM to the run's process (a trainer saves a checkpoint, then exits)."""
    pid = self.running(name)
    if pid is None:
      raise BadRequest(f"run {name!r} is not running", status=409)
    os.kill(pid, signal.SIGTERM)
    return pid


def _write_config(workdir: str, config: dict) -> str:
  path = os.path.join(workdir, CONFIG_JSON)
  _write_json(path, config)
  loader = os.path.join(workdir, CONFIG_PY)
  with open(loader, "w") as f:
    f.write(_LOADER.format(json=CONFIG_JSON, path=path))
  return loader


def _write_json(path: str, obj: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)
