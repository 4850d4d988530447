"""Where each side's CPU train step spends its time: the original's per-op profile (torch
profiler) beside ours (XLA:CPU's per-op trace), on the shapes of benchmarks/vs_original.py.

  python benchmarks/profile_original.py --original PATH [--models dense,moe] [--steps 3]
      [--top 12] [--json OUT]

PATH: a local checkout of the original (thevesperhouse-hub/VelvetOptimizer) or its
`python/` folder, imported at run time, never copied here; needs torch in this Python.
Each side runs in its own process: the original's training-loop body under
`torch.profiler` (self CPU time per aten op, and its forward / backward / optimizer
phases), ours through `benchmarks/profile_step.py`. Both sides' op times are grouped the
same way: matmuls (with what XLA fuses into them), gathers / scatters / sorts / top-k,
and everything else; summed op time exceeds the wall time where ops run at once.
Profiling slows both steps, so the wall times here are not the speed comparison:
vs_original.py is. docs/performance.md reads these tables.
"""
from __future__ import annotations

import argparse, datetime, json, os, re, shlex, sys, tempfile  # noqa: E401
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling scripts
from vs_original import (MODELS, Refused, _Parser, _run_json, _worker_cmd,  # noqa: E402
                         check_common_args, machine_info, report_main, run_side)
from vs_original_sides import BATCH, ROOT, SEQ, VOCAB  # noqa: E402

GROUPS = ("matmul", "gather / scatter / sort / top-k", "other")
_TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv",
                 "aten::mv", "aten::dot", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
_TORCH_INDEXING = re.compile(r"aten::(index|index_add_|index_put_|index_select|nonzero|"
                             r"scatter|scatter_add_|gather|topk|sort|argsort|embedding"
                             r"|embedding_dense_backward|masked_select)$")
_XLA_MATMUL = re.compile(r"(ynn_fusion|dot_general|dot|convolution)$")
_XLA_INDEXING = re.compile(r"(gather|scatter|sort|top_?k)")


def group_of(op: str, side: str) -> str:
  """The group (one of GROUPS) of an op: an aten op name ("original") or an XLA op kind
  ("vesperjax")."""
  if side == "original":
    if op in _TORCH_MATMUL:
      return GROUPS[0]
    return GROUPS[1] if _TORCH_INDEXING.match(op) else GROUPS[2]
  if _XLA_MATMUL.match(op):
    return GROUPS[0]
  return GROUPS[1] if _XLA_INDEXING.search(op) else GROUPS[2]


def grouped_ms(ms: dict, side: str) -> dict:
  """{group: ms per step} of {op: ms per step}."""
  out = dict.fromkeys(GROUPS, 0.0)
  for op, t in ms.items():
    out[group_of(op, side)] += t
  return out


def format_model(model: str, r: dict, top: int) -> str:
  o, v = r["original"], r["vesperjax"]
  go, gv = grouped_ms(o["ms"], "original"), grouped_ms(v["ms"], "vesperjax")
  rows = [("step wall time, profiled (s)", f"{o['wall_s']:.2f}", f"{v['wall_s']:.2f}"),
          ("threads busy (process CPU / wall)", f"{o['cpu_s_per_step'] / o['wall_s']:.1f}",
           f"{v['cpu_s_per_step'] / v['wall_s']:.1f}")]
  rows += [(f"{g} (ms)", f"{go[g]:,.0f}", f"{gv[g]:,.0f}") for g in GROUPS]
  rows.append(("op time summed (ms)", f"{sum(go.values()):,.0f}", f"{sum(gv.values()):,.0f}"))
  lines = [f"## {model}", "", "| per step | original | vesperjax |", "|---|---:|---:|"]
  lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
  phases = ", ".join(f"{k} {t:,.0f} ms" for k, t in o.get("phases", {}).items())
  lines += ["", f"the original by phase: {phases}", ""]
  for side, d in (("original", o), ("vesperjax", v)):
    lines.append(f"{side}, top {top} ops: ms/step, calls/step, op")
    for op, t in sorted(d["ms"].items(), key=lambda kv: -kv[1])[:top]:
      lines.append(f"  {t:8.1f} {d['count'].get(op, 0):7.0f}  {op}  [{group_of(op, side)}]")
  return "\n".join(lines)


def format_report(report: dict) -> str:
  head = [f"python benchmarks/profile_original.py {report['argv']}",
          f"date: {report['date']}; machine: {report['machine'].get('cpu_model', '?')}, "
          f"{report['machine'].get('affinity', '?')} cores; {report['steps']} profiled steps "
          f"per side; vocab {VOCAB}, batch {BATCH} x {SEQ}, fp32, Velvet", ""]
  return "\n".join(head + [format_model(m, r, report["top"])
                           for m, r in report["models"].items()])


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="profile_original.py")
  p.add_argument("--original", required=True)
  p.add_argument("--models", default="dense,moe")
  p.add_argument("--steps", type=int, default=3, help="profiled steps per side")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=12)
  p.add_argument("--json", default=None)
  a = p.parse_args(argv)
  if a.steps < 1 or a.warmup < 0 or a.top < 1:
    raise Refused(f"need --steps >= 1, --warmup >= 0, --top >= 1 (got {a.steps}, "
                  f"{a.warmup}, {a.top})")
  return check_common_args(a)


def profile_ours(model: str, steps: int) -> dict:
  """profile_step.py's op table of our step, in its own process."""
  with tempfile.TemporaryDirectory(prefix="vesperjax-profile-") as tmp:
    out = os.path.join(tmp, "ops.json")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--config",
           str(ROOT / MODELS[model][0]), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
           "--steps", str(steps), "--out", tmp, "--json", out,
           f"--config.model.vocab_size={VOCAB}"]
    run_side(cmd, f"vesperjax's {model} profile")
    with open(out) as f:
      return json.load(f)


def run(args, argv: list[str]) -> dict:
  models = {}
  for model in args.models:
    spec = dict(package=str(args.package), moe=MODELS[model][1], steps=args.steps,
                warmup=args.warmup)
    o = _run_json(_worker_cmd("original_profile", spec), f"the original's {model} profile")
    original = dict(wall_s=o["wall_s"], cpu_s_per_step=o["cpu_s_per_step"],
                    ms={k: v["ms"] for k, v in o["ops"].items()},
                    count={k: v["calls"] for k, v in o["ops"].items()}, phases=o["phases"])
    models[model] = dict(original=original, vesperjax=profile_ours(model, args.steps))
  return dict(argv=" ".join(shlex.quote(a) for a in argv), steps=args.steps, top=args.top,
              date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              machine=machine_info(), models=models)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  return report_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
  sys.exit(main())
