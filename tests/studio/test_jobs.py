"""Vesper Studio end to end over HTTP (a real uvicorn server): a training job started
from the form, its metrics arriving live, Stop (SIGTERM: checkpoint, exit 143), Resume,
a failing job's error line, a benchmark's table and plots, and streamed chat."""
import json
import os

import pytest

pytest.importorskip("starlette")
from tests.studio.server import FORM, Server, make_data, wait_for  # noqa: E402
from vesperjax.studio.app import create_app  # noqa: E402

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
  base = tmp_path_factory.mktemp("studio")
  server = Server(create_app(str(base / "runs"), [make_data(base)], max_jobs=2))
  yield server, base / "runs"
  server.close()


def events(http, url, want, timeout=120):
  """Reads server-sent events from `url` until `want(events)`; returns them."""
  got = []
  with http.stream("GET", url, timeout=timeout) as r:
    kind = None
    for line in r.iter_lines():
      if line.startswith("event: "):
        kind = line[7:]
      elif line.startswith("data: "):
        got.append((kind, json.loads(line[6:])))
        if want(got):
          return got
  raise AssertionError(f"stream ended: {got}")


def row(http, name):
  return http.get(f"/api/runs/{name}").json()


def test_train_live_stop_resume_and_chat(studio):
  server, runs_dir = studio
  http = server.http
  r = http.post("/api/jobs/train", json={**FORM, "name": "live", "steps": 100000})
  assert r.status_code == 201, r.text
  got = events(http, "/api/runs/live/events",
               lambda ev: any(k == "metrics" for k, _ in ev))
  first = [d for k, d in got if k == "metrics"][0][0]
  assert first["step"] >= 1 and 0 < first["loss"] < 10
  assert any(k == "state" and d["state"] == "running" for k, d in got)
  jobs = server.app.app.state.jobs
  pid = jobs.procs["live"].pid
  assert os.getsid(pid) != os.getsid(0)  # its own session: a closed browser or studio
  jobs.max_jobs = 1                       # leaves it running
  r = http.post("/api/jobs/train", json={**FORM, "name": "second", "steps": 5})
  assert r.status_code == 409 and "limit" in r.json()["error"]
  jobs.max_jobs = 2
  assert http.post("/api/runs/live/resume", json={}).status_code == 409  # running
  assert http.post("/api/runs/live/stop", json={}).status_code == 200
  info = wait_for(lambda: row(http, "live"), lambda d: d["state"] != "running",
                  what="the stop")
  assert info["state"] == "stopped" and info["checkpoints"], info
  job = json.load(open(runs_dir / "live" / "studio_job.json"))
  assert job["exit_code"] == 143  # SIGTERM: the trainer saved, then exited 128 + 15
  assert job["form"]["steps"] == 100000 and "pid_start" in job  # what Resume, Stop use
  assert not (runs_dir / "live" / "studio_config.py").exists()  # no Python to run there
  stopped_at = info["checkpoints"][-1]

  # chat with the saved checkpoint: text arrives as it is generated, then `done`
  got = []
  with http.stream("POST", "/api/chat", json={"run": "live", "prompt": "def ",
                                               "max_tokens": 12, "temperature": 0}) as r:
    assert r.status_code == 200
    for line in r.iter_lines():
      if line.startswith("event: "):
        got.append(line[7:])
  assert got.count("text") >= 1 and got[-1] == "done", got
  r = http.post("/api/chat", json={"run": "live", "prompt": "x", "top_p": 2})
  assert r.status_code == 400 and "top_p" in r.json()["error"]

  assert http.post("/api/runs/live/resume", json={}).status_code == 202
  wait_for(lambda: row(http, "live"), lambda d: (d["step"] or 0) > stopped_at,
           what="steps after resuming")
  assert http.post("/api/runs/live/stop", json={}).status_code == 200
  wait_for(lambda: row(http, "live"), lambda d: d["state"] == "stopped", what="2nd stop")
  console = (runs_dir / "live" / "console.log").read_text()
  assert console.count("$ ") == 2 and "--resume" in console


def test_failed_job_shows_its_error_line(studio):
  server, _ = studio
  r = server.http.post("/api/jobs/train", json={**FORM, "name": "bad", "steps": 5,
                                                "dataset": "bad.txt"})
  assert r.status_code == 201
  info = wait_for(lambda: row(server.http, "bad"), lambda d: d["state"] != "running",
                  what="the failure")
  assert info["state"] == "failed" and info["error"].startswith("error: "), info


def test_benchmark_job_reports_its_table_and_plots(studio):
  server, _ = studio
  http = server.http
  r = http.post("/api/jobs/benchmark", json={**FORM, "name": "bench", "steps": 3,
                                             "lrs": ["1e-3"], "seeds": 1,
                                             "arms": ["velvet", "adamw"]})
  assert r.status_code == 201, r.text
  info = wait_for(lambda: row(http, "bench"), lambda d: d["state"] != "running",
                  what="the benchmark")
  assert info["state"] == "finished", info
  table = http.get("/api/runs/bench/benchmark").json()["table"]
  assert "velvet" in table and "adamw" in table
  assert "loss_curves.png" in info["plots"]
  png = http.get("/api/runs/bench/plots/loss_curves.png")
  assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
