"""Training and benchmark jobs: child processes started from checked, typed form values
(forms.py; an argv list, never a shell string). Each runs in its own session, so closing
the browser or stopping the studio leaves it running; its output goes to the run's
console.log, and its form, command, pid and exit status to studio_job.json.

A run folder may hold files from anyone who can write there, so nothing read from one is
executed or signalled as given: Resume checks the recorded form again, as a new form is
checked, and builds the command itself; Stop signals a pid read from a file only when it
is verifiably that run's process (procs.py)."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

from vesperjax.studio import forms, procs, runs, safe_files
from vesperjax.studio.paths import BadRequest, run_dir

CONFIG_JSON = "studio_config.json"
# The --config file of every job: in the package, reading the config from its argument
# (so a job runs no Python from its run folder)
LOADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "job_config.py")


class Jobs:
  """Starts, watches and stops the studio's jobs; at most `max_jobs` at once."""

  def __init__(self, runs_root: str, data_roots: list[str], max_jobs: int = 2):
    self.runs_root, self.data_roots, self.max_jobs = runs_root, data_roots, max_jobs
    self.procs: dict[str, subprocess.Popen] = {}
    self.records: dict[str, dict] = {}  # each child's job record, as this studio wrote it

  # -- watching ----------------------------------------------------------------------
  def poll(self) -> set[str]:
    """Reap finished children (recording their exit status); the names still running."""
    for name, proc in list(self.procs.items()):
      code = proc.poll()
      if code is None:
        continue
      del self.procs[name]
      record = self.records.pop(name, {})
      try:
        workdir = run_dir(self.runs_root, name)
        job = runs.read_json(workdir, runs.JOB) or {}
        if job.get("pid") == proc.pid:  # not a later job's file (another studio's)
          _write_json(workdir, runs.JOB, dict(record, exit_code=code,
                                               finished=time.time()))
      except (BadRequest, OSError):
        pass  # the run folder was moved away: nowhere to record it
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

  def _new_run(self, form: dict) -> tuple[str, str]:
    name = form.get("name")
    workdir = run_dir(self.runs_root, name, must_exist=False)
    if os.path.lexists(workdir):
      raise BadRequest(f"a run named {name!r} exists; choose another name", status=409)
    return name, workdir

  def _make(self, name: str, workdir: str) -> None:
    try:
      os.mkdir(workdir)
    except FileExistsError:  # made by someone else since _new_run looked
      raise BadRequest(f"a run named {name!r} exists; choose another name",
                       status=409) from None
    except OSError as e:
      raise BadRequest(f"cannot make the run folder {name!r}: {e.strerror}",
                       status=500) from None

  def start_train(self, form: dict) -> str:
    """A new training run from the New run form; returns its name."""
    self._check_capacity()
    name, workdir = self._new_run(form)
    typed = forms.train_form(form, self.data_roots)
    config = forms.run_config(typed)
    self._make(name, workdir)
    self._spawn(name, workdir, "train", typed, config)
    return name

  def start_benchmark(self, form: dict) -> str:
    """A Velvet-vs-AdamW benchmark (`vesperjax.benchmark optimizers`); returns its name."""
    self._check_capacity()
    name, workdir = self._new_run(form)
    typed = forms.benchmark_form(form, self.data_roots)
    config = forms.run_config(typed)
    self._make(name, workdir)
    self._spawn(name, workdir, "benchmark", typed, config)
    return name

  def resume(self, name: str) -> None:
    """Train run `name` on from its latest checkpoint, or rerun its benchmark (which
    keeps the finished runs): from the form its job file records (or, for a run the
    studio did not start, config.json's form fields), checked as a new form is."""
    workdir = run_dir(self.runs_root, name)
    if self.running(name):
      raise BadRequest(f"run {name!r} is running", status=409)
    self._check_capacity()
    try:
      runs.refuse_links_out(workdir)  # the trainer opens the run's files following links
      job = runs.read_json(workdir, runs.JOB) or {}
      kind = "benchmark" if job.get("kind") == "benchmark" else "train"
      if kind == "train" and not runs.checkpoints(workdir):
        raise BadRequest("it has no checkpoint to resume from", status=409)
      saved = None
      roots = self.data_roots
      if kind == "benchmark":
        typed = forms.benchmark_form(forms.recorded_form(job.get("form"), roots), roots)
      elif "form" in job:
        typed = forms.train_form(forms.recorded_form(job["form"], roots), roots)
      else:  # a run from a shell, or from an older studio
        saved = runs.read_json(workdir, "config.json")
        typed = forms.train_form(forms.recorded_form(forms.form_of_config(saved), roots),
                                 roots)
      config = forms.run_config(typed)
      changed = forms.config_differences(saved, config) if saved is not None else []
      if changed:
        raise BadRequest(f"its config.json sets {', '.join(changed[:4])} unlike the "
                         "studio's form; resume it from a shell", status=409)
    except BadRequest as e:
      raise BadRequest(f"cannot resume run {name!r}: {e}",
                       status=409 if e.status == 400 else e.status) from None
    self._spawn(name, workdir, kind, typed, config, resume=True)

  def _spawn(self, name: str, workdir: str, kind: str, typed: dict, config: dict,
             resume: bool = False) -> None:
    argv = [sys.executable, "-P", *_args(kind, typed, config, workdir, resume)]
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent,
                                                        os.environ.get("PYTHONPATH")])))
    try:
      _write_json(workdir, CONFIG_JSON, config)  # for a shell: job_config.py:PATH
      console = safe_files.open_append(workdir, runs.CONSOLE)
    except OSError as e:
      raise BadRequest(f"run {name!r}: cannot write into its folder: {e}",
                       status=409) from None
    try:
      os.write(console, f"$ {shlex.join(argv)}\n".encode())
      # -P: the run folder (the child's working directory) is not put on sys.path, so
      # a module placed there is never imported
      proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, cwd=workdir, env=env,
                              start_new_session=True)
    finally:
      os.close(console)
    record = dict(kind=kind, form=typed, argv=argv, **procs.identity(proc.pid),
                  started=time.time(), exit_code=None)
    if kind == "benchmark":
      record.update(arms=typed["arms"], steps=typed["steps"])
    self.procs[name], self.records[name] = proc, record
    _write_json(workdir, runs.JOB, record)

  # -- stopping ----------------------------------------------------------------------
  def stop(self, name: str) -> int:
    """SIGTERM to the run's process (a trainer saves a checkpoint, then exits): our own
    child, or a process a run file names that is verifiably this run's."""
    workdir = run_dir(self.runs_root, name)
    if name in self.poll():
      proc = self.procs[name]
      proc.send_signal(signal.SIGTERM)  # not yet reaped: its pid is still its own
      return proc.pid
    holders = [h for h in (runs.lock_holder(workdir), runs.read_json(workdir, runs.JOB))
               if h and h.get("exit_code") is None and procs.alive(h.get("pid"))]
    for holder in holders:
      if procs.is_runs_process(holder, workdir):
        try:
          os.kill(holder["pid"], signal.SIGTERM)
        except ProcessLookupError:
          continue  # it ended meanwhile
        except PermissionError:
          raise BadRequest(f"run {name!r} is held by pid {holder['pid']}, which the "
                           "studio may not signal; stop it where it runs",
                           status=409) from None
        return holder["pid"]
    if holders:
      raise BadRequest(f"run {name!r} is held by pid {holders[0]['pid']}, a process the "
                       "studio did not start and cannot tell is this run's (its command "
                       "line names no --workdir of this run); stop it where it runs",
                       status=409)
    raise BadRequest(f"run {name!r} is not running", status=409)


def _args(kind: str, typed: dict, config: dict, workdir: str, resume: bool) -> list[str]:
  """The command line of a job, built from checked values only."""
  if ":" in LOADER:  # config_flags splits FILE:ARG at the first colon
    raise BadRequest(f"the studio's package path {LOADER} holds ':'; install it "
                     "elsewhere", status=500)
  config_arg = f"{LOADER}:{json.dumps(config, separators=(',', ':'))}"
  if kind == "train":
    return ["-m", "vesperjax.train", "--config", config_arg, "--workdir", workdir,
            *(["--resume"] if resume else [])]
  return ["-m", "vesperjax.benchmark", "optimizers", "--config", config_arg, "--workdir",
          workdir, "--steps", str(typed["steps"]), "--seeds", str(typed["seeds"]),
          "--lrs", ",".join(repr(x) for x in typed["lrs"]), "--optimizers",
          ",".join(typed["arms"])]


def _write_json(workdir: str, name: str, obj: dict) -> None:
  safe_files.write_file(workdir, name, json.dumps(obj, indent=1).encode())
