"""The runner of the one-shot acceptance scripts (gpu_acceptance.py, tpu_acceptance.py).

Each section runs in its own process (a clean peak-memory figure per model) under a time
box, unused time rolling over to the sections after it; a section that fails or runs out
of time is recorded and the rest still run. The parent writes OUT/acceptance.json, .md
and .log and prints the markdown table last; the exit status is 1 when anything failed.
"""
from __future__ import annotations

import argparse, dataclasses, json, math, os, resource, signal  # noqa: E401
import subprocess, sys, tempfile, time  # noqa: E401
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """One acceptance script: its title ("GPU"), the file the children run, its sections
  as (section, models, weight in seconds) for the full and the reduced mode, the
  backend its full mode needs ("gpu" | "tpu"), and the child's extra flags and env."""
  title: str
  script: Path
  jobs: list
  reduced_jobs: list
  backend: str
  child_flags: Callable[[argparse.Namespace], list] = lambda args: []
  child_env: Callable[[argparse.Namespace], dict] = lambda args: {}


def clean(x):  # strict JSON: NaN / inf -> null
  if isinstance(x, dict):
    return {str(k): clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  return None if isinstance(x, float) and not math.isfinite(x) else x


def dump(obj, path):
  with open(f"{path}.tmp", "w") as f:
    json.dump(clean(obj), f, indent=1, allow_nan=False, default=str)
  os.replace(f"{path}.tmp", path)


def add_arguments(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--out", help="folder for acceptance.json / .md / .log")
  ap.add_argument("--reduced", action="store_true",
                  help="CPU smoke shapes, Pallas interpreted (chosen without the device)")
  ap.add_argument("--budget", type=float, default=450.0, help="seconds for all sections")
  ap.add_argument("--only", help="comma-separated section names")
  for hidden in ("--child", "--models", "--result", "--inject-crash"):
    ap.add_argument(hidden, default="", help=argparse.SUPPRESS)


def child_main(args, backend: str, sections: dict) -> None:
  """Run section `args.child`, saving its result dict to `args.result` as it grows."""
  import jax  # pylint: disable=import-outside-toplevel
  res = {"done": False}
  save = lambda: dump(res, args.result)  # noqa: E731
  if args.inject_crash == args.child:
    os._exit(3)  # tests: a section that dies must not stop the others
  on = jax.default_backend()
  ctx = argparse.Namespace(args=args, reduced=args.reduced, big=not args.reduced,
                           gpu=on == "gpu", tpu=on == "tpu", backend=backend)
  ctx.interpret, dev = on != backend, jax.devices()[0]
  res["device"] = ctx.device = dict(kind=dev.device_kind, backend=on, jax=jax.__version__,
                                    count=jax.local_device_count())
  save()
  if on != backend and not ctx.reduced:
    raise SystemExit(f"jax sees no {backend.upper()}: use --reduced (CPU shapes, Pallas "
                     "interpreted)")
  sections[args.child](ctx, res, save)
  res["done"] = True
  save()


def _log_tail(text: str) -> list:
  return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(
      ("WARNING: All log messages", "I0000", "W0000", "E0000"))][-3:]  # start-up noise


def run_job(spec: Acceptance, args, section, models, box, tmp, log):
  result, start = Path(tmp) / f"{section}-{models.replace(',', '_')}.json", time.perf_counter()
  cmd = [sys.executable, str(spec.script), "--child", section, "--models", models,
         "--result", str(result), "--inject-crash", args.inject_crash,
         *spec.child_flags(args)] + ["--reduced"] * args.reduced
  env = dict(os.environ, PYTHONUNBUFFERED="1", **spec.child_env(args))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.reduced and not args.on_device:
    env.setdefault("JAX_PLATFORMS", "cpu")
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(Path(tmp) / "child.log", "w+") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
      rc, status = proc.wait(timeout=box), None
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)  # the child and its compilers (ptxas)
      rc, status = proc.wait(), f"timeout after {box:.0f} s (partial results kept)"
    out.seek(0)
    text = out.read()
  log.write(f"===== {section} {models} rc={rc}\n{text[-200_000:]}\n")
  res = json.loads(result.read_text()) if result.exists() else {}
  used = resource.getrusage(resource.RUSAGE_CHILDREN)
  res.update(status=status or ("ok" if rc == 0 and res.get("done") else f"crashed (rc={rc})"),
             wall_s=round(time.perf_counter() - start, 1), box_s=round(box),
             cpu_s=round(used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime, 1))
  if res["status"] != "ok":
    res["log_tail"] = _log_tail(text)
  if section == "throughput" and not res.get("models"):  # died before its first row
    res["models"] = [dict(preset=m, status=res["status"], error=" / ".join(res["log_tail"]))
                     for m in models.split(",")]
  return res


def markdown(report):
  s, g = report["sections"], lambda x, f, k=1.0: "-" if x is None else format(x * k, f)
  dev = next((v["device"] for v in s.values() if v.get("device")), {})
  rows = [("run", report["mode"], "FAIL" if report["failed"] else "PASS",
           f"{report['wall_s']:.0f} s", f"{dev.get('kind', '?')} x {dev.get('count', '?')}, "
           f"jax {dev.get('jax', '?')}")]
  rows += [(k, "(section)", "FAIL", v["status"], " / ".join(v.get("log_tail", [])))
           for k, v in s.items() if v["status"] != "ok"]
  rows += [("kernels", c["name"], "SKIP" if c.get("skipped") else "PASS" if c["passed"]
            else "FAIL", f"{g(c.get('error'), '.1e')} (thr {g(c.get('threshold'), '.0e')})",
            c.get("exception") or c.get("note") or ", ".join(
                f"{k} {g(e['error'], '.1e')}" for k, e in c["errors"].items()))
           for c in s.get("kernels", {}).get("checks", [])]
  rows += [("bench", r["name"], "ERR" if r["note"] else "ok", ", ".join(
      [f"{g(r['ms'], '.3f')} ms"] + [f"{r[k]:{f}} {u}" for k, f, u in (
          ("gb_s", ".0f", "GB/s"), ("tflop_s", ".1f", "TFLOP/s"), ("roof_pct", ".0f", "% roof"))
                                     if r[k] is not None]), r["note"])
           for r in s.get("bench", {}).get("rows", [])]
  for m in s.get("throughput", {}).get("models", []):
    item = f"{m['preset']} B={m.get('batch')} S={m.get('seq_len')} {m.get('dtype', '')}"
    rows.append(("throughput", item, "FAIL", m["status"], m.get("error")) if m["status"] != "ok"
                else ("throughput", item, "ok", f"{1e3 * m['step_s_median']:.1f} ms/step, "
                      f"{m['tokens_per_s']:,.0f} tok/s, MFU {g(m['mfu'], '.1%')}",
                      "GiB measured / compiler / plan: " + " / ".join(g(x, ".2f", 2**-30) for x in (
                          m["measured_peak_bytes"], m["compiler_bytes"]["total"],
                          m.get("plan_bytes")))))
  t = s.get("timing", {})
  rows += [("timing", f"{r['group']} {r['name']}", "ERR" if r["ms"] is None else "ok",
            f"{g(r['ms'], '.3f')} ms", "fastest" if "bwd" in r["name"] and t["fastest"].get(
                r["group"]) == r["name"].split("impl=")[1] else r.get("error"))
           for r in t.get("rows", [])]
  cell = lambda x: str(x or "").replace("|", "/").replace("\n", " ")[:200]  # noqa: E731
  return "\n".join(["| section | item | result | figures | note |", "|---|---|---|---|---|"]
                   + ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows])


def run(spec: Acceptance, args, on_device: bool) -> int:
  """The parent: every job of the mode in its own child, then the three files."""
  if not args.out:
    raise SystemExit("error: --out is required")
  args.on_device = on_device
  args.reduced = args.reduced or not on_device
  start, out = time.perf_counter(), Path(args.out)
  jobs = [j for j in (spec.reduced_jobs if args.reduced else spec.jobs)
          if not args.only or j[0] in args.only.split(",")]
  out.mkdir(parents=True, exist_ok=True)
  report = dict(command=" ".join(["python3", *sys.argv]), budget_s=args.budget, sections={},
                mode="reduced" if args.reduced else "full")
  with tempfile.TemporaryDirectory() as tmp, open(out / "acceptance.log", "w") as log:
    for i, (section, models, weight) in enumerate(jobs):
      left = args.budget - (time.perf_counter() - start)
      box = max(10.0, left * weight / sum(w for _, _, w in jobs[i:]))
      label = f"[{section}{' ' + models if models else ''}]"
      print(f"{label} time box {box:.0f} s ...", flush=True)
      res = run_job(spec, args, section, models, box, tmp, log)
      print(f"{label} {res['status']} in {res['wall_s']} s ({res['cpu_s']} s CPU)", flush=True)
      prev = report["sections"].setdefault(section, res)
      if prev is not res:  # throughput: one process per model, one section
        prev["models"] += res["models"]
        prev["wall_s"], prev["cpu_s"] = (round(prev[k] + res[k], 1) for k in ("wall_s", "cpu_s"))
        prev["status"] = res["status"] if prev["status"] == "ok" else prev["status"]
        prev.setdefault("log_tail", res.get("log_tail") or [])
  s, report["wall_s"] = report["sections"], round(time.perf_counter() - start, 1)
  report["failed"] = ([k for k, v in s.items() if v["status"] != "ok"]
                      + [c["name"] for c in s.get("kernels", {}).get("checks", [])
                         if c["passed"] is False]
                      + [m["preset"] for m in s.get("throughput", {}).get("models", [])
                         if m["status"] != "ok"])
  table = markdown(report)
  dump(report, out / "acceptance.json")
  (out / "acceptance.md").write_text(f"# {spec.title} acceptance ({report['mode']})\n\n{table}\n")
  print(f"\nacceptance: {'FAIL: ' + ', '.join(report['failed']) if report['failed'] else 'PASS'}"
        f" ({report['wall_s']:.0f} s; {out}/acceptance.json)\n\n{table}", flush=True)
  return 1 if report["failed"] else 0
