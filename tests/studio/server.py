"""Vesper Studio in a thread (a real uvicorn server on a free port) for the job and
browser tests, with a toy-sized training form and a data root."""
import os
import signal
import socket
import threading
import time

import httpx
import uvicorn

# A toy model: each step takes milliseconds, so a job's time is start-up and compiling.
TOY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "ffn_size": 64, "lora_rank": 4,
       "lora_topk": 2}
FORM = {"dataset": "corpus.txt", "tokenizer": "byte", "preset": "tiny", "model": TOY,
        "batch_size": 8, "seq_len": 16, "lr": 1e-3}


def make_data(base) -> str:
  """A data root with a small code corpus and a file that is not UTF-8."""
  data = base / "data"
  data.mkdir()
  (data / "corpus.txt").write_text("\n\n".join(
      f"def f{i}(x):\n    return x + {i}" for i in range(400)))
  (data / "bad.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
  return str(data)


def wait_for(get, ok, timeout=240, what=""):
  end = time.time() + timeout
  while True:
    value = get()
    if ok(value):
      return value
    if time.time() > end:
      raise AssertionError(f"timed out waiting for {what}: last {value}")
    time.sleep(0.3)


class Server:
  def __init__(self, app):
    self.app = app
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)
    self.thread.start()
    while not self.server.started:
      time.sleep(0.05)
    self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

  def close(self):
    self.server.should_exit = True
    self.thread.join(10)
    for proc in list(self.app.app.state.jobs.procs.values()):  # jobs left running
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
