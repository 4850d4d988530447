"""Vesper Studio with files in --runs and --data-root written by someone else (issue
#35): a command in a job file, a foreign pid in a .lock, links leading out of a run
folder or a dataset folder. No real job is launched: Popen is replaced by a recorder."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
from tests.studio.server import TOY  # noqa: E402
from tests.studio.conftest import client, write_run  # noqa: E402
from vesperjax.studio import forms, jobs, paths, runs, safe_files  # noqa: E402

HAS_PROC = os.path.exists("/proc/self/cmdline")
# a recorded form a resumed job may start from: the embedded corpus, a toy model
FORM = dict(preset="tiny", dataset="stdlib", tokenizer="byte", model=TOY, steps=20,
            seq_len=16, batch_size=8, lr=1e-3, optimizer=None)


class Launches(list):
  """The argv of each job started (a stand-in for Popen that starts nothing)."""

  def popen(self, argv, **kw):
    self.append(list(argv))
    return _NoProcess()


class _NoProcess:
  pid = os.getpid()  # a live pid to record; never signalled (it ends at once)
  returncode = 0

  def poll(self):
    return 0

  def send_signal(self, sig):
    pass


@pytest.fixture
def launches(monkeypatch):
  out = Launches()
  monkeypatch.setattr(subprocess, "Popen", out.popen)
  return out


def outside_file(tmp_path, text="KEEP\n", name="outside.txt"):
  path = tmp_path / name
  path.write_text(text)
  return path


def relink(run, rel, target):
  path = run / rel
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.is_dir() and not path.is_symlink():
    os.rename(path, str(path) + ".old")
  elif os.path.lexists(path):
    path.unlink()
  os.symlink(target, path)


def test_resume_never_runs_the_command_a_job_file_holds(tree, launches, tmp_path):
  root, data = tree
  mark = tmp_path / "pwned"
  argv = [sys.executable, "-c", f"open({str(mark)!r}, 'w')"]
  write_run(root, "cmd", job={"kind": "benchmark", "argv": argv, "arms": ["velvet"],
                              "steps": 5, "exit_code": 143})
  write_run(root, "noarms", job={"kind": "benchmark", "argv": argv, "steps": 5,
                                 "exit_code": 143})
  c = client(root, [data])
  for name in ("cmd", "noarms"):
    r = c.post(f"/api/runs/{name}/resume", json={})
    assert r.status_code == 409, r.text
    assert "records no form" in r.json()["error"]
  assert launches == [] and not mark.exists()


def test_resume_checks_the_recorded_form_again_and_builds_the_command(tree, launches,
                                                                       tmp_path):
  root, data = tree
  secret = outside_file(tmp_path, "root:x:0:0\n", "shadow")
  write_run(root, "far", job={"kind": "train", "form": dict(FORM, dataset=str(secret)),
                              "exit_code": 143})
  write_run(root, "zero", job={"kind": "train", "form": dict(FORM, steps=0),
                               "exit_code": 143})
  c = client(root, [data])
  r = c.post("/api/runs/far/resume", json={})
  assert r.status_code == 409 and "not under a data root" in r.json()["error"], r.text
  r = c.post("/api/runs/zero/resume", json={})
  assert r.status_code == 409 and "steps: give a whole number" in r.json()["error"]
  assert launches == []
  form = dict(FORM, dataset=str(data / "sub" / "a.txt"))
  good = write_run(root, "good", job={"kind": "train", "exit_code": 143, "form": form})
  assert c.post("/api/runs/good/resume", json={}).status_code == 202
  (argv,) = launches
  assert argv[1:4] == ["-P", "-m", "vesperjax.train"]
  assert argv[-3:] == ["--workdir", str(good.resolve()), "--resume"]
  loader, _, config = argv[argv.index("--config") + 1].partition(":")
  assert loader == jobs.LOADER  # in the package, not the run folder
  assert os.path.dirname(loader) == os.path.dirname(os.path.abspath(jobs.__file__))
  assert json.loads(config)["data"]["dataset"] == str((data / "sub" / "a.txt").resolve())
  assert not (good / "studio_config.py").exists()  # no Python in the run folder
  job = json.loads((good / runs.JOB).read_text())
  assert job["form"]["steps"] == 20 and job["argv"] == argv
  bench = dict(FORM, arms=["velvet", "adamw"], lrs=[1e-3], seeds=1)
  write_run(root, "bench", job={"kind": "benchmark", "form": bench, "exit_code": 143})
  assert c.post("/api/runs/bench/resume", json={}).status_code == 202
  assert launches[-1][3:5] == ["vesperjax.benchmark", "optimizers"]
  assert launches[-1][-2:] == ["--optimizers", "velvet,adamw"]


def test_resume_of_a_run_from_elsewhere_checks_its_config_json(tree, launches, tmp_path):
  root, data = tree
  secret = outside_file(tmp_path, "root:x:0:0\n", "shadow")
  d = write_run(root, "shell")
  config = json.loads((d / "config.json").read_text())
  config["data"] = {"dataset": str(secret), "tokenizer": "byte"}
  (d / "config.json").write_text(json.dumps(config))
  c = client(root, [data])
  r = c.post("/api/runs/shell/resume", json={})
  assert r.status_code == 409 and "not under a data root" in r.json()["error"], r.text
  assert launches == []
  # the config the studio would write for the same form: resumed from its form fields
  config = forms.run_config(forms.train_form(FORM, [str(data)]))
  (d / "config.json").write_text(json.dumps(config))
  assert c.post("/api/runs/shell/resume", json={}).status_code == 202
  assert "form" in json.loads((d / runs.JOB).read_text())  # the next Resume's
  config["train"]["grad_accum"] = 4  # set from a shell: no form field keeps it
  (write_run(root, "shell2") / "config.json").write_text(json.dumps(config))
  launches.clear()
  r = c.post("/api/runs/shell2/resume", json={})
  assert r.status_code == 409 and "train.grad_accum" in r.json()["error"], r.text
  assert launches == []


def test_stop_signals_only_a_process_that_is_the_runs(tree):
  root, _ = tree
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    write_run(root, "held", lock_pid=sleeper.pid)
    write_run(root, "jobbed", job={"kind": "train", "pid": sleeper.pid,
                                   "exit_code": None})
    c = client(root)
    for name in ("held", "jobbed"):
      r = c.post(f"/api/runs/{name}/stop", json={})
      assert r.status_code == 409, r.text
      assert "a process the studio did not start" in r.json()["error"]
    assert sleeper.poll() is None  # not signalled
  finally:
    sleeper.kill()
    sleeper.wait()


@pytest.mark.skipif(not HAS_PROC, reason="needs /proc to tell a run's process")
def test_stop_signals_the_trainer_that_names_the_run_folder(tree):
  root, _ = tree
  d = write_run(root, "trainer")
  other = write_run(root, "other")
  # a relative --workdir, read from the process's working directory
  trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "--workdir", "trainer"], cwd=root)
  try:
    for run in (d, other):
      (run / ".lock").write_text(json.dumps({"pid": trainer.pid,
                                             "host": socket.gethostname()}))
    c = client(root)
    r = c.post("/api/runs/other/stop", json={})  # the pid is another run's trainer
    assert r.status_code == 409 and trainer.poll() is None, r.text
    r = c.post("/api/runs/trainer/stop", json={})
    assert r.status_code == 200 and r.json()["pid"] == trainer.pid, r.text
    assert trainer.wait(10) == -signal.SIGTERM
  finally:
    trainer.kill()
    trainer.wait()


def test_links_leading_out_of_a_run_are_not_read(tree, tmp_path):
  root, _ = tree
  d = write_run(root, "sly", job={"kind": "train", "exit_code": 2})
  relink(d, "plots/x.png", outside_file(tmp_path, "SECRET-PNG"))
  relink(d, runs.CONSOLE, outside_file(tmp_path, "error: SECRET-LOG\n", "log"))
  relink(d, "metrics.jsonl", outside_file(tmp_path, '{"step": 7, "loss": 0.5}\n', "m"))
  relink(d, "model_config.json", outside_file(tmp_path, '{"secret": 1}', "mc.json"))
  relink(d, "config.json", outside_file(tmp_path, '{"secret": 2}', "c.json"))
  (tmp_path / "ckpts" / "30").mkdir(parents=True)
  relink(d, "checkpoints", tmp_path / "ckpts")
  c = client(root)
  r = c.get("/api/runs/sly/plots/x.png")
  assert r.status_code == 403 and b"SECRET" not in r.content
  info = c.get("/api/runs/sly").json()
  assert info["config"] is None and info["model_config"] is None
  assert info["checkpoints"] == [] and info["step"] is None
  assert info["error"] == "exited with status 2"  # not the linked file's error line
  assert c.get("/api/runs/sly/metrics").json() == []
  assert runs.read_lines(str(d.resolve()), runs.CONSOLE) == ([], 0)  # the live console


def test_runs_list_leaves_out_a_run_folder_leading_out(tree, tmp_path):
  root, _ = tree
  away = write_run(tmp_path, "away-run")
  os.symlink(away, root / "away")
  names = [r["name"] for r in client(root).get("/api/runs").json()]
  assert "away" not in names and "done" in names
  assert client(root).get("/api/runs/away").status_code == 400  # as the detail page


@pytest.mark.parametrize("link", [runs.CONSOLE, "studio_job.json.tmp", "studio_config.py",
                                  ".config.json.tmp", ".lock", "checkpoints/20/state"])
def test_resume_writes_nothing_through_a_link(tree, launches, tmp_path, link):
  root, data = tree
  d = write_run(root, "w", job={"kind": "train", "form": FORM, "exit_code": 143})
  target = outside_file(tmp_path)
  relink(d, link, target)
  r = client(root, [data]).post("/api/runs/w/resume", json={})
  assert r.status_code == 409 and "link leading out" in r.json()["error"], r.text
  assert target.read_text() == "KEEP\n" and launches == []


def test_safe_writes_replace_a_link_instead_of_following_it(tmp_path):
  d = tmp_path / "run"
  d.mkdir()
  target = outside_file(tmp_path)
  os.symlink(target, d / "studio_job.json")
  safe_files.write_file(str(d), "studio_job.json", b"{}")
  assert target.read_text() == "KEEP\n" and not (d / "studio_job.json").is_symlink()
  assert (d / "studio_job.json").read_text() == "{}"
  os.symlink(target, d / runs.CONSOLE)
  with pytest.raises(safe_files.OutsideRoot):
    safe_files.open_append(str(d), runs.CONSOLE)
  os.mkfifo(d / "fifo")
  with pytest.raises(safe_files.OutsideRoot, match="not a plain file"):
    safe_files.read_bytes(str(d), "fifo")  # would block a server thread forever


def test_dataset_folders_are_checked_file_by_file(tree, launches, tmp_path):
  root, data = tree
  corpus = data / "corpus"
  (corpus / "deep").mkdir(parents=True)
  (corpus / "a.txt").write_text("hello\n" * 20)
  os.symlink(outside_file(tmp_path, "SECRET\n", "o.txt"), corpus / "deep" / "b.txt")
  c = client(root, [data])
  form = {"name": "n", "steps": 5, "dataset": "corpus"}
  r = c.post("/api/jobs/train", json=form)
  assert r.status_code == 400 and "deep/b.txt" in r.json()["error"], r.text
  assert "leads outside the data roots" in r.json()["error"]
  assert launches == [] and not (root / "n").exists()
  with pytest.raises(paths.BadRequest, match="leads outside"):
    paths.data_file([str(data)], "0:corpus")
  (corpus / "deep" / "b.txt").unlink()
  os.symlink(corpus / "a.txt", corpus / "deep" / "b.txt")  # a link staying inside: fine
  os.symlink("/", corpus / ".hidden")  # skipped by the trainer's reader too
  assert paths.data_file([str(data)], "corpus") == str(corpus.resolve())
  # and again on Resume: a link added after the job started
  d = write_run(root, "later", job={"kind": "train", "exit_code": 143,
                                    "form": dict(FORM, dataset=str(corpus.resolve()))})
  os.symlink(tmp_path / "o.txt", corpus / "c.txt")
  r = c.post("/api/runs/later/resume", json={})
  assert r.status_code == 409 and "c.txt" in r.json()["error"], r.text
  assert launches == [] and d.exists()


def test_chat_does_not_load_a_run_with_a_link_leading_out(tree, tmp_path):
  root, _ = tree
  d = write_run(root, "talk")
  relink(d, "tokenizer.json", outside_file(tmp_path, "{}", "tok.json"))
  events = []
  with client(root).stream("POST", "/api/chat", json={"run": "talk", "prompt": "x"}) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("data: "):
        events.append(json.loads(line[6:]))
  assert "link leading out" in events[-1], events
