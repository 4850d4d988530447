"""The studio's ASGI app (Starlette): the JSON API, live run events (server-sent events),
streamed chat, and the static front end. `create_app(...)` builds it.

Requests are bounded (a body over `max_body` bytes is refused with 413 before it is read,
JSON deeper than MAX_JSON_DEPTH or holding NaN / Infinity with 400), and every bad input
is answered with a 4xx and one JSON message."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import threading
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from vesperjax.studio import runs, safe_files
from vesperjax.studio.chat import Chat, sampling_options
from vesperjax.studio.jobs import Jobs
from vesperjax.studio.paths import BadRequest, list_datasets, run_dir

STATIC = os.path.join(os.path.dirname(__file__), "static")
TOKEN_COOKIE = "vesper_studio_token"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
POLL_S = 0.5  # how often live events look at a run's files
MAX_BODY_BYTES = 1 << 20  # the default --max-body: the forms are a few hundred bytes
MAX_JSON_DEPTH = 32  # the forms nest 2 deep
EVENT_READ = 1 << 20  # most bytes of a file one live-events poll reads (the rest: next)
MAX_PLOT = 32 << 20


def finite(x, depth: int = 0):
  """`x` with NaN / Infinity as None (JSON has neither: a run's loss may be NaN), and
  nothing nested over 64 deep (a run file may nest deeper than a response should)."""
  if isinstance(x, float):
    return x if math.isfinite(x) else None
  if depth > 64:
    return None
  if isinstance(x, dict):
    return {k: finite(v, depth + 1) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [finite(v, depth + 1) for v in x]
  return x


def dumps(x) -> str:
  """JSON text of `x`, non-finite numbers as null (walked only when there are some)."""
  try:
    return json.dumps(x, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
  except (ValueError, RecursionError):
    return json.dumps(finite(x), ensure_ascii=False, allow_nan=False,
                      separators=(",", ":"))


class JSON(JSONResponse):
  """A JSON response whose non-finite numbers are null (never a 500 from a NaN)."""

  def render(self, content) -> bytes:
    return dumps(content).encode()


def _sse(event: str, data) -> bytes:
  return f"event: {event}\ndata: {dumps(data)}\n\n".encode()


def _json_depth(obj) -> int:
  """How deep lists and objects nest in `obj` (counted without recursion), stopping
  once past MAX_JSON_DEPTH."""
  deepest, stack = 0, [(obj, 1)]
  while stack and deepest <= MAX_JSON_DEPTH:
    x, depth = stack.pop()
    if isinstance(x, (dict, list)):
      deepest = max(deepest, depth)
      stack.extend((v, depth + 1) for v in (x.values() if isinstance(x, dict) else x))
  return deepest


def _no_constant(name: str):
  raise BadRequest(f"{name} is not a number the studio takes (use a finite number)")


def _finite_float(text: str) -> float:
  x = float(text)
  if not math.isfinite(x):  # 1e999 reads as inf
    raise BadRequest(f"{text[:40]} is out of range (use a finite number)")
  return x


def parse_json_body(raw: bytes) -> dict:
  """A request body as a JSON object; one BadRequest for anything else."""
  too_deep = BadRequest(f"the request's JSON nests over {MAX_JSON_DEPTH} levels deep")
  try:
    body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
  except BadRequest:
    raise
  except RecursionError:
    raise too_deep from None
  except ValueError:
    raise BadRequest("the request body is not JSON") from None
  if _json_depth(body) > MAX_JSON_DEPTH:
    raise too_deep
  if not isinstance(body, dict):
    raise BadRequest("send a JSON object")
  return body


class Guard:
  """ASGI middleware: with a token, every request must carry it (Authorization: Bearer,
  the cookie it sets, or ?token=); without one, only local Host names are served (no
  DNS rebinding). POSTs must be JSON from this origin (no cross-site forms)."""

  def __init__(self, app, token: str | None, max_body: int = MAX_BODY_BYTES):
    self.app, self.token, self.max_body = app, token, max_body

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1")
               for k, v in scope["headers"]}
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    problem, set_cookie = self._check(scope, headers, query)
    if problem:
      status, message = problem
      return await JSON({"error": message}, status)(scope, receive, send)
    if not set_cookie:
      return await self.app(scope, receive, send)

    async def send_with_cookie(message):
      if message["type"] == "http.response.start":
        cookie = (f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/")
        message = dict(message, headers=[*message["headers"],
                                         (b"set-cookie", cookie.encode())])
      await send(message)
    return await self.app(scope, receive, send_with_cookie)

  def _check(self, scope, headers, query):
    host = headers.get("host", "")
    length = headers.get("content-length")
    if length is not None:  # refused before a byte of the body is read
      if not (length.isascii() and length.isdigit()):
        return (400, "Content-Length is not a byte count"), False
      if int(length) > self.max_body:
        return (413, f"request body over {self.max_body} bytes"), False
    if scope["method"] == "POST":
      origin = headers.get("origin")
      if origin:
        parts = urlsplit(origin)
        if (parts.scheme, parts.netloc.lower()) != (scope.get("scheme", "http"),
                                                    host.lower()):
          return (403, "cross-origin request refused"), False
      media_type = headers.get("content-type", "").split(";")[0].strip().lower()
      if media_type != "application/json":
        return (415, "send JSON (Content-Type: application/json)"), False
    if self.token is None:
      name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
      if name not in LOCAL_HOSTS:
        return (403, f"host {host!r} refused: the studio serves 127.0.0.1 without a "
                "token"), False
      return None, False
    given = headers.get("authorization", "").removeprefix("Bearer ").strip()
    cookies = dict(c.strip().split("=", 1) for c in headers.get("cookie", "").split(";")
                   if "=" in c)
    from_query = (query.get("token") or [""])[0]
    for candidate, via_query in ((given, False), (cookies.get(TOKEN_COOKIE, ""), False),
                                 (from_query, True)):
      if candidate and hmac.compare_digest(candidate.encode(), self.token.encode()):
        return None, via_query
    return (401, "this studio needs its access token: open the URL it printed "
            "(…/?token=…)"), False


def create_app(runs_root: str, data_roots: list[str] = (), *, token: str | None = None,
               max_jobs: int = 2, max_body: int = MAX_BODY_BYTES) -> Starlette:
  os.makedirs(runs_root, exist_ok=True)
  data_roots = list(data_roots)
  jobs = Jobs(runs_root, data_roots, max_jobs)
  chat = Chat()

  def workdir(request: Request) -> tuple[str, str]:
    name = request.path_params["name"]
    return name, run_dir(runs_root, name)

  async def form(request: Request) -> dict:
    """The JSON object a POST carries, read no further than `max_body` bytes (a chunked
    body declares no length up front)."""
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > max_body:
        raise BadRequest(f"request body over {max_body} bytes", status=413)
      chunks.append(chunk)
    return parse_json_body(b"".join(chunks))

  async def index(request):
    return FileResponse(os.path.join(STATIC, "index.html"))

  async def options(request):
    from vesperjax.bench.optimizers import ARMS
    from vesperjax.config import PRESET_NAMES
    return JSON(dict(presets=list(PRESET_NAMES), optimizers=["velvet", "adamw"],
                     arms=list(ARMS), datasets=list_datasets(data_roots),
                     data_roots=data_roots, max_jobs=max_jobs))

  async def list_runs(request):
    return JSON(runs.list_runs(runs_root, jobs.poll()))

  async def run_detail(request):
    name, path = workdir(request)
    return JSON(runs.detail(path, name, name in jobs.poll()))

  async def metrics(request):
    name, path = workdir(request)
    records, _ = runs.read_metrics(path)
    return JSON(records)

  async def events(request):
    """Server-sent events: `metrics` (new metrics.jsonl records), `console` (new console
    lines) and `state` (the run's row when it changes), from the start of each file."""
    name, path = workdir(request)

    async def stream():
      m_off = c_off = 0
      last, latest, followed = None, {}, None
      while not await request.is_disconnected():
        replaced, followed = runs.metrics_replaced(path, followed, m_off)
        if replaced:  # a resume rewrote it: the page draws the records again
          m_off, latest = 0, {}
          yield _sse("metrics-reset", [])
        records, m_off = runs.read_metrics(path, m_off, EVENT_READ)
        if records:
          yield _sse("metrics", records)
        lines, c_off = runs.read_lines(path, runs.CONSOLE, c_off, EVENT_READ)
        if lines:
          yield _sse("console", [ln.rsplit("\r", 1)[-1] for ln in lines])
        row = runs.summarize(path, name, name in jobs.poll(),
                             runs.update_latest(latest, records))
        row.pop("mtime")
        if row != last:
          last = row
          yield _sse("state", row)
        await asyncio.sleep(POLL_S)
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  async def benchmark(request):
    from vesperjax.bench.optimizers import summarize
    from vesperjax.bench.tables import format_table
    name, path = workdir(request)
    report = runs.read_json(path, runs.REPORT)
    if report is None or not report.get("runs"):
      raise BadRequest(f"run {name!r} has no benchmark report", status=404)
    try:
      summary = summarize(report)  # also of a report still growing
      table = format_table(summary)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError,
            ZeroDivisionError):
      raise BadRequest(f"run {name!r}: its {runs.REPORT} is malformed",
                       status=422) from None
    return JSON(dict(table=table,
                     summary={k: v for k, v in summary.items() if k != "table"}))

  async def plot(request):
    name, path = workdir(request)
    file = request.path_params["file"]
    if "/" in file or not file.endswith(".png"):
      raise BadRequest(f"no plot {file!r}", status=404)
    try:  # read through the checked descriptor: a link leading out is never served
      data = safe_files.read_bytes(path, os.path.join("plots", file), limit=MAX_PLOT)
    except safe_files.OutsideRoot as e:
      raise BadRequest(f"plot {file!r}: {e}", status=403) from None
    except OSError:
      raise BadRequest(f"no plot {file!r}", status=404) from None
    return Response(data, media_type="image/png")

  async def start_train(request):
    return JSON({"name": jobs.start_train(await form(request))}, 201)

  async def start_benchmark(request):
    return JSON({"name": jobs.start_benchmark(await form(request))}, 201)

  async def stop(request):
    name, _ = workdir(request)
    return JSON({"pid": jobs.stop(name)})

  async def resume(request):
    name, _ = workdir(request)
    jobs.resume(name)
    return JSON({"name": name}, 202)

  async def chat_stream(request):
    """Server-sent events: `text` deltas as tokens are sampled, then `done` (tokens,
    seconds, step) or `error`."""
    body = await form(request)
    path = run_dir(runs_root, body.get("run"))
    options = sampling_options(body)
    checkpoint = body.get("checkpoint", "latest")
    prompt = body.get("prompt")
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731

    def work():
      try:
        put(("done", chat.stream(path, checkpoint, prompt, lambda t: put(("text", t)),
                                 **options)))
      except BadRequest as e:
        put(("error", str(e)))
      except Exception as e:  # noqa: BLE001  (one line to the page, not a traceback)
        put(("error", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))

    threading.Thread(target=work, daemon=True).start()

    async def stream():
      while True:
        kind, data = await queue.get()
        yield _sse(kind, data)
        if kind != "text":
          return
    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

  async def bad_request(request, exc: BadRequest):
    return JSON({"error": str(exc)}, exc.status)

  async def not_found(request, exc):
    return JSON({"error": f"no such page: {request.url.path}"}, 404)

  async def watch():  # reaps finished children, so their exit status is recorded
    while True:
      jobs.poll()
      await asyncio.sleep(POLL_S)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    task = asyncio.create_task(watch())
    yield
    task.cancel()

  routes = [
      Route("/", index),
      Route("/api/options", options),
      Route("/api/runs", list_runs),
      Route("/api/runs/{name}", run_detail),
      Route("/api/runs/{name}/metrics", metrics),
      Route("/api/runs/{name}/events", events),
      Route("/api/runs/{name}/benchmark", benchmark),
      Route("/api/runs/{name}/plots/{file}", plot),
      Route("/api/runs/{name}/stop", stop, methods=["POST"]),
      Route("/api/runs/{name}/resume", resume, methods=["POST"]),
      Route("/api/jobs/train", start_train, methods=["POST"]),
      Route("/api/jobs/benchmark", start_benchmark, methods=["POST"]),
      Route("/api/chat", chat_stream, methods=["POST"]),
      Mount("/static", StaticFiles(directory=STATIC), name="static"),
  ]
  app = Starlette(routes=routes, lifespan=lifespan,
                  exception_handlers={BadRequest: bad_request, 404: not_found})
  app.state.jobs, app.state.chat = jobs, chat
  return Guard(app, token, max_body)
