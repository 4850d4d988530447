"""`python -m vesperjax.studio --runs runs/ [--data-root DIR ...] [--host 127.0.0.1]
[--port 8765] [--token T] [--max-jobs 2] [--max-body 1048576]`.

Serves Vesper Studio (docs/studio.md). On 127.0.0.1 it needs no token; on any other
host it requires one (--token, or one generated and printed with the URL). Bad input
ends with one `error:` line and exit status 2.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys

from absl import flags

from vesperjax.cli import run_cli

FLAGS = flags.FlagValues()
_RUNS = flags.DEFINE_string("runs", "runs", "Folder of run directories to show and start "
                            "runs in.", flag_values=FLAGS)
_DATA_ROOTS = flags.DEFINE_multi_string("data-root", [], "Folder whose datasets the New "
                                        "run form may use (repeatable).",
                                        flag_values=FLAGS)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind.", flag_values=FLAGS)
_PORT = flags.DEFINE_integer("port", 8765, "Port to bind.", flag_values=FLAGS)
_TOKEN = flags.DEFINE_string("token", None, "Access token every request must carry "
                             "(default: none on 127.0.0.1, generated elsewhere).",
                             flag_values=FLAGS)
_MAX_JOBS = flags.DEFINE_integer("max-jobs", 2, "Most training / benchmark jobs at once.",
                                 flag_values=FLAGS)
# app.MAX_BODY_BYTES: app is imported only in run(), where a missing extra is reported
_MAX_BODY = flags.DEFINE_integer("max-body", 1 << 20, "Largest request body in bytes "
                                 "(larger ones are refused with 413 unread).",
                                 flag_values=FLAGS)

LOCAL = ("127.0.0.1", "localhost", "::1")


def run() -> int:
  try:
    import uvicorn

    from vesperjax.studio.app import create_app
  except ImportError as e:
    raise ValueError(f"the studio needs the studio extra ({e.name} is missing): pip "
                     "install 'vesperjax[studio]'") from None
  for root in _DATA_ROOTS.value:
    if not os.path.isdir(root):
      raise ValueError(f"--data-root {root}: no such folder")
  if os.path.exists(_RUNS.value) and not os.path.isdir(_RUNS.value):
    raise ValueError(f"--runs {_RUNS.value}: not a folder")
  if not 0 < _PORT.value < 65536:
    raise ValueError(f"--port {_PORT.value}: must be 1-65535")
  if _MAX_JOBS.value < 1:
    raise ValueError(f"--max-jobs {_MAX_JOBS.value}: must be >= 1")
  if not 1024 <= _MAX_BODY.value <= 1 << 30:
    raise ValueError(f"--max-body {_MAX_BODY.value}: must be from 1024 to {1 << 30} "
                     "bytes")
  token = _TOKEN.value
  if token is not None and len(token) < 16:
    raise ValueError("--token: use at least 16 characters")
  if token is None and _HOST.value not in LOCAL:
    token = secrets.token_urlsafe(24)
  _check_port(_HOST.value, _PORT.value)
  app = create_app(_RUNS.value, _DATA_ROOTS.value, token=token, max_jobs=_MAX_JOBS.value,
                   max_body=_MAX_BODY.value)
  host = f"[{_HOST.value}]" if ":" in _HOST.value else _HOST.value
  url = f"http://{host}:{_PORT.value}/" + (f"?token={token}" if token else "")
  print(f"Vesper Studio: {url}  (runs: {os.path.abspath(_RUNS.value)})", flush=True)
  uvicorn.run(app, host=_HOST.value, port=_PORT.value, log_level="warning")
  return 0


def _check_port(host: str, port: int) -> None:
  """One error line for an address in use (uvicorn would log it and exit)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def main(argv=None) -> int:
  return run_cli(sys.argv if argv is None else argv, run, flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
