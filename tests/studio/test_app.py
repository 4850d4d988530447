"""Vesper Studio's API without child processes: run directories read back, names and
paths confined, forms validated, the access token and origin rules."""
import os
import socket

import pytest

pytest.importorskip("starlette")
from tests.studio.conftest import client  # noqa: E402
from vesperjax.studio import paths  # noqa: E402


def test_runs_table_reads_state_steps_and_losses(tree):
  root, _ = tree
  rows = {r["name"]: r for r in client(root).get("/api/runs").json()}
  assert {n: r["state"] for n, r in rows.items()} == {
      "done": "finished", "halted": "stopped", "live": "running", "broken": "failed"}
  done = rows["done"]
  assert (done["step"], done["max_steps"], done["loss"], done["eval_loss"]) == (
      20, 20, pytest.approx(4.8), 4.5)
  assert done["preset"] == "tiny" and done["optimizer"] == "velvet"
  assert rows["broken"]["error"] == "error: data.dataset /x: no such file"


def test_run_detail_metrics_and_errors(tree):
  root, _ = tree
  c = client(root)
  d = c.get("/api/runs/done").json()
  assert d["checkpoints"] == [20] and d["config"]["train"]["max_steps"] == 20
  assert [r["step"] for r in c.get("/api/runs/done/metrics").json()] == [10, 20, 20]
  r = c.get("/api/runs/nope")
  assert r.status_code == 404 and r.json() == {"error": "no run named 'nope'"}
  assert c.get("/api/runs/..%2Fetc").status_code in (400, 404)
  assert c.get("/api/runs/done/plots/x.png").status_code == 404
  assert c.get("/api/runs/done/benchmark").status_code == 404
  assert c.post("/api/runs/halted/stop", json={}).status_code == 409  # not running


def test_run_names_and_datasets_stay_inside_their_roots(tree, tmp_path):
  root, data = tree
  os.symlink(tmp_path, root / "escape")
  for bad in ("..", "../x", "a/b", "", ".hidden", "x" * 65):
    with pytest.raises(paths.BadRequest):
      paths.run_dir(str(root), bad, must_exist=False)
  with pytest.raises(paths.BadRequest, match="not inside"):
    paths.run_dir(str(root), "escape")
  os.symlink("/etc", data / "etc")
  (tmp_path / "outside.txt").write_text("x")
  os.symlink(tmp_path / "outside.txt", data / "link.txt")
  for bad in ("../outside.txt", "/etc/passwd", "etc/passwd", "link.txt"):
    with pytest.raises(paths.BadRequest):
      paths.data_file([str(data)], bad)
  assert paths.data_file([str(data)], "sub/a.txt") == str(data.resolve() / "sub" / "a.txt")
  names = [d["name"] for d in paths.list_datasets([str(data)])]
  assert names == ["sub/a.txt"]  # not notes.md, not the links leading out


@pytest.mark.parametrize("form,status,message", [
    ({"name": "x/y"}, 400, "run name"),
    ({"name": "done"}, 409, "exists"),
    ({"name": "n", "steps": 0}, 400, "steps: give a whole number"),
    ({"name": "n", "steps": "ten"}, 400, "steps"),
    ({"name": "n", "steps": 5, "preset": "huge"}, 400, "preset: 'huge' is not one of"),
    ({"name": "n", "steps": 5, "lr": "fast"}, 400, "lr: 'fast' is not a number"),
    ({"name": "n", "steps": 5, "tokenizer": "bpe:x; rm -rf /"}, 400, "tokenizer"),
    ({"name": "n", "steps": 5, "dataset": "../../etc/passwd"}, 400, "without '..'"),
    ({"name": "n", "steps": 5, "model": {"num_layers": 0}}, 400, "num_layers"),
    ({"name": "n", "steps": 5, "model": {"hidden_size": 100, "num_heads": 3}}, 400,
     "num_heads"),
    ({"name": "n", "steps": 5, "model": {"nope": 1}}, 400, "config.model.nope"),
    ({"name": "n", "steps": 5, "optimizer": "sgd"}, 400, "optimizer"),
])
def test_bad_forms_get_a_message_and_start_nothing(tree, form, status, message):
  root, data = tree
  r = client(root, [data]).post("/api/jobs/train", json=form)
  assert r.status_code == status, r.text
  assert message in r.json()["error"]
  assert not (root / "n").exists()


def test_bad_benchmark_forms(tree):
  root, data = tree
  c = client(root, [data])
  base = {"name": "b", "steps": 5}
  for extra, message in (({"arms": ["sgd"]}, "arms"), ({"lrs": ["x"]}, "lrs"),
                         ({"lrs": "1e-3"}, "lrs"), ({"seeds": 99}, "seeds")):
    r = c.post("/api/jobs/benchmark", json={**base, **extra})
    assert r.status_code == 400 and message in r.json()["error"]
    assert not (root / "b").exists()


def test_token_host_and_origin_rules(tree):
  root, _ = tree
  token = "t" * 24
  c = client(root, token=token)
  assert c.get("/api/runs").status_code == 401
  assert c.get("/api/runs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
  assert c.get("/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
  first = c.get(f"/?token={token}")  # the printed URL: sets the cookie the page then uses
  assert first.status_code == 200 and "Vesper Studio" in first.text
  assert c.get("/api/runs").status_code == 200
  local = client(root)
  r = local.get("/api/runs", headers={"Host": "evil.example:8765"})  # DNS rebinding
  assert r.status_code == 403
  r = local.post("/api/jobs/train", json={"name": "n"},
                 headers={"Origin": "http://evil.example"})
  assert r.status_code == 403
  r = local.post("/api/jobs/train", content=b"name=n",
                 headers={"Content-Type": "text/plain"})
  assert r.status_code == 415


def test_static_front_end_is_served_offline(tree):
  root, _ = tree
  c = client(root)
  page = c.get("/").text
  for asset in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js"):
    assert asset in page
    assert c.get(asset).status_code == 200
  assert "http" not in page.replace("http-equiv", "")  # no CDN
  opts = c.get("/api/options").json()
  assert "tiny" in opts["presets"] and "adamw-clipped-b1" in opts["arms"]


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
  from vesperjax.studio.__main__ import main
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    for args, message in (
        (["--data-root", str(tmp_path / "nope")], "--data-root"),
        (["--port", "0"], "--port"),
        (["--token", "short"], "at least 16"),
        (["--max-jobs", "0"], "--max-jobs"),
        (["--max-body", "10"], "--max-body"),
        (["--port", str(port)], "cannot listen on 127.0.0.1"),
    ):
      code = main(["studio", "--runs", str(tmp_path / "runs"), *args])
      err = capsys.readouterr().err
      assert code == 2 and err.startswith("error: ") and message in err, err
      assert len(err.strip().splitlines()) == 1
