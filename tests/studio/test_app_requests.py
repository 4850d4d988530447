"""Vesper Studio's requests bounded (issue #35): bodies over the limit refused with 413
before they are read, JSON too deep, NaN / Infinity and fractional counts refused, odd
datasets, malformed run files, and the Origin / Content-Type rules; each a 4xx with one
JSON message, never a 500."""
import asyncio
import json
import subprocess

import pytest

pytest.importorskip("starlette")
from tests.studio.conftest import client, write_run  # noqa: E402
from vesperjax.studio import runs  # noqa: E402
from vesperjax.studio.app import MAX_BODY_BYTES, MAX_JSON_DEPTH, create_app  # noqa: E402

JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def no_jobs(monkeypatch):
  """Every request here is refused: a job started would be a failure, not a process."""
  def refuse(argv, **kw):
    raise AssertionError(f"a job was started: {argv}")
  monkeypatch.setattr(subprocess, "Popen", refuse)


def asgi_post(app, path, headers, chunks):
  """POSTs `chunks` (an iterator of bytes) to the ASGI `app` itself, so that the test
  sees how much of the body it reads; returns (status, JSON body, chunks read)."""
  read, sent = [0], []

  async def receive():
    chunk = next(chunks, None)
    if chunk is None:
      return {"type": "http.request", "body": b"", "more_body": False}
    read[0] += 1
    return {"type": "http.request", "body": chunk, "more_body": True}

  async def send(message):
    sent.append(message)

  scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
           "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
           "root_path": "", "query_string": b"", "server": ("127.0.0.1", 8765),
           "client": ("127.0.0.1", 50000),
           "headers": [(k.lower().encode(), v.encode()) for k, v in
                       {"host": "127.0.0.1:8765", **JSON_HEADERS, **headers}.items()]}
  asyncio.run(app(scope, receive, send))
  status = sent[0]["status"]
  body = b"".join(m.get("body", b"") for m in sent[1:])
  return status, json.loads(body), read[0]


def test_a_declared_large_body_is_refused_before_it_is_read(tree):
  root, _ = tree
  app = create_app(str(root))
  status, body, read = asgi_post(app, "/api/jobs/train",
                                 {"Content-Length": str(10 << 30)}, iter([b"{}"]))
  assert (status, read) == (413, 0) and "over" in body["error"]
  status, body, _ = asgi_post(app, "/api/jobs/train", {"Content-Length": "12x"},
                              iter([b"{}"]))
  assert status == 400 and "Content-Length" in body["error"]


def test_a_chunked_body_is_read_no_further_than_the_limit(tree):
  root, _ = tree
  chunk = b" " * (64 << 10)
  chunks = iter([b'{"name": "x"'] + [chunk] * 512)  # 32 MB with no declared length
  status, body, read = asgi_post(create_app(str(root)), "/api/jobs/train", {}, chunks)
  assert status == 413 and "over" in body["error"]
  assert read <= MAX_BODY_BYTES // len(chunk) + 2


def test_large_and_deep_json_bodies_get_a_4xx_message(tree):
  root, _ = tree
  c = client(root)
  big = json.dumps({"name": "x" * (2 << 20)})
  r = c.post("/api/jobs/train", content=big, headers=JSON_HEADERS)
  assert r.status_code == 413 and "over" in r.json()["error"]
  for depth in (MAX_JSON_DEPTH + 5, 100_000):  # the parser's recursion ends near 1,000
    deep = '{"name": "n", "model": ' + "[" * depth + "]" * depth + "}"
    r = c.post("/api/jobs/train", content=deep, headers=JSON_HEADERS)
    assert r.status_code == 400 and "nests over" in r.json()["error"], r.text
  assert not (root / "n").exists()


@pytest.mark.parametrize("field,value,message", [
    ("top_k", "Infinity", "Infinity is not a number"),
    ("max_tokens", "-Infinity", "-Infinity is not a number"),
    ("seed", "NaN", "NaN is not a number"),
    ("temperature", "1e999", "out of range"),
    ("max_tokens", "1.9", "max_tokens: give a whole number"),  # not cut to 1
    ("top_k", "1e300", "top_k: give a whole number"),
    ("seed", "-1", "seed: give a whole number"),
    ("top_k", '"\u00b2"', "top_k: give a whole number"),
])
def test_chat_numbers_must_be_finite_and_whole(tree, field, value, message):
  root, _ = tree
  body = '{"run": "done", "prompt": "x", "%s": %s}' % (field, value)
  r = client(root).post("/api/chat", content=body, headers=JSON_HEADERS)
  assert r.status_code == 400 and message in r.json()["error"], r.text


@pytest.mark.parametrize("dataset,message", [
    ("a\x00b.txt", "control character"),
    ("\u00b2:good.txt", "no such file"),  # '²' is no root index (isdigit says it is)
    ("x" * 5000, "too long"),
])
def test_odd_datasets_get_a_message(tree, dataset, message):
  root, data = tree
  r = client(root, [data]).post("/api/jobs/train",
                                json={"name": "n", "steps": 5, "dataset": dataset})
  assert 400 <= r.status_code < 500 and message in r.json()["error"], r.text


def test_form_numbers_are_range_checked(tree):
  root, data = tree
  c = client(root, [data])
  for extra, message in (({"steps": 5.5}, "steps: give a whole number"),
                         ({"steps": True}, "steps: give a whole number"),
                         ({"lr": "nan"}, "lr: 'nan' must be a positive number"),
                         ({"model": {"hidden_size": 1 << 40}}, "model.hidden_size"),
                         ({"batch_size": "8.0"}, "batch_size: give a whole number")):
    r = c.post("/api/jobs/train", json={"name": "n", "steps": 5, **extra})
    assert r.status_code == 400 and message in r.json()["error"], (extra, r.text)
  r = c.post("/api/jobs/benchmark", json={"name": "n", "steps": 5, "arms": [{}]})
  assert r.status_code == 400 and "arms" in r.json()["error"]
  assert not (root / "n").exists()


def test_origin_scheme_and_content_type_are_checked_exactly(tree):
  root, _ = tree
  c = client(root)
  r = c.post("/api/jobs/train", json={"name": "x/y"},
             headers={"Origin": "https://127.0.0.1:8765"})  # the page is http
  assert r.status_code == 403
  r = c.post("/api/jobs/train", content=b'{"name": "x/y"}',
             headers={"Content-Type": "application/jsonp"})
  assert r.status_code == 415
  r = c.post("/api/jobs/train", content=b'{"name": "x/y"}',
             headers={"Content-Type": "Application/JSON; charset=utf-8",
                      "Origin": "http://127.0.0.1:8765"})
  # accepted, then checked
  assert r.status_code == 400 and "run name" in r.json()["error"]


def test_malformed_run_files_show_as_data_not_errors(tree):
  root, _ = tree
  d = write_run(root, "nan", job={"kind": "benchmark", "arms": [1, 2], "steps": "x",
                                  "exit_code": "?"})
  with open(d / "metrics.jsonl", "a") as f:
    f.write('\n{"step": 30, "loss": NaN, "eval_loss": Infinity}\n' + "[" * 5000 + "\n")
  (d / runs.REPORT).write_text(json.dumps({"runs": [1, 2]}))
  (d / "config.json").write_text(json.dumps({"model": [], "optim": {"name": 3},
                                             "train": {"max_steps": "many"}}))
  c = client(root)
  rows = {r["name"]: r for r in c.get("/api/runs").json()}
  assert rows["nan"]["step"] == 30 and rows["nan"]["loss"] is None
  assert rows["nan"]["optimizer"] is None and rows["nan"]["max_steps"] is None
  metrics = c.get("/api/runs/nan/metrics").json()
  assert metrics[-1] == {"step": 30, "loss": None, "eval_loss": None}
  r = c.get("/api/runs/nan/benchmark")
  assert r.status_code == 422 and "malformed" in r.json()["error"]
