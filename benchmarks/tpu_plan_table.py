"""The TPU plan table of docs/tpu.md: every preset planned on v5e-8, v5p-8, v6e-8 and a
multi-host v5e slice, from deviceless libtpu compiles (`vesperjax.plan`).

    nice python benchmarks/tpu_plan_table.py [--out benchmarks/tpu-plan/DATE.json]
        [--only tiny,small] [--no-max-batch] [--table-only]

Compiler figures, not measured runs: libtpu's peak memory of the compiled step (what it
checks against the chip), for compile-only chips of a topology; no TPU runs anything.
Cells: each preset (`plan_tables.run_config`: vocab 32768, Velvet, bf16 compute, scanned
layers) at seq 2048 on each slice, with FSDP over all its chips (mesh.fsdp = chips):
first one compile at one sequence per chip (per-chip memory and whether it fits 75% of
the chip), then, unless --no-max-batch, the largest global batch that fits under remat
none (`program.max_batch`, seeded with that compile). Results are written after every
compile step (a stopped run resumes, and a rerun with --out of an older report grows it);
progress goes to stderr; the markdown table is printed at the end and written beside
the JSON.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling plan_tables

# first: libtpu's environment before anything loads it
from vesperjax.planning import tpu_targets  # noqa: E402
from plan_tables import (GiB, MEM_FRACTION, VOCAB, header, load, log, save,  # noqa: E402
                         write_markdown)
import plan_tables  # noqa: E402

PRESETS = ("tiny", "small", "tiny-moe", "medium", "medium-moe", "large", "xlarge",
           "large-moe")
SLICES = (("v5e", "2x4", "v5e-8"), ("v5p", "2x2x1", "v5p-8"), ("v6e", "2x4", "v6e-8"),
          ("v5e", "4x4", "v5e-16"))
SEQ = 2048


def key(preset: str, target: str, topology: str) -> str:
  return f"{preset}|{target}:{topology}"


def cells(only=()) -> list[tuple[str, str, str]]:
  return [(p, t, topo) for p in PRESETS if not only or p in only for t, topo, _ in SLICES]


def run_for(preset: str, target: str, topology: str, batch: int | None = None):
  chips = tpu_targets.chips(topology)
  run = plan_tables.run_config(preset, SEQ, fsdp=chips)
  return run.replace(train=dict(batch_size=batch or chips))


def plan_cell(preset: str, target: str, topology: str) -> dict:
  """One compile at one sequence per chip."""
  from vesperjax.planning import program
  p = program.plan_step(run_for(preset, target, topology), target=target,
                        topology=topology, mem_fraction=MEM_FRACTION, progress=log)
  keep = ("devices", "hosts", "mesh", "batch_size", "params_total", "per_device_bytes",
          "compiler_refused", "device_memory_bytes", "budget_bytes", "fits", "compile_s",
          "collectives", "custom_calls", "model_flops", "xla_flops")
  return {k: p[k] for k in keep}


def max_batch_cell(preset: str, target: str, topology: str, plan: dict) -> dict:
  """The largest batch under remat none, seeded with the plan's compile."""
  from vesperjax.planning import program
  chips = tpu_targets.chips(topology)
  start = time.time()
  found = program.max_batch(
      run_for(preset, target, topology), target=target, topology=topology, remat="none",
      mem_fraction=MEM_FRACTION, seed=[(plan["batch_size"],
                                        plan["per_device_bytes"]["total"])],
      start=8 * chips, progress=log)
  found["seconds"] = round(time.time() - start, 1)
  return found


def _gib(n) -> str:
  return "…" if n is None else f"{n / GiB:.2f}"


def markdown(data: dict) -> str:
  from vesperjax.config import model_preset
  from vesperjax.model.size import num_params
  lines = ["| preset | params | slice (chips, hosts) | GiB per chip at 1 seq/chip | fits "
           "75% | max global batch (remat none) | GiB per chip at it |",
           "|---|---:|---|---:|---|---:|---:|"]
  names = {(t, topo): name for t, topo, name in SLICES}
  for preset, target, topology in cells():
    k = key(preset, target, topology)
    p, m = data["plans"].get(k), data["max_batch"].get(k)
    if p is None:
      continue
    params = num_params(model_preset(preset, vocab_size=VOCAB))
    where = (f"{names[target, topology]} {target}:{topology} ({p['devices']}, "
             f"{p['hosts']})")
    mem = p["per_device_bytes"]["total"]
    refused = " (libtpu refused)" if p["compiler_refused"] else ""
    if m is None:
      best, at = ("0" if not p["fits"] else "…"), None
    else:
      best = f"{m['max_batch']}{'+' if m['capped'] else ''}"
      at = m["per_device_bytes"]
    lines.append(f"| {preset} | {params / 1e6:,.0f}M | {where} | {_gib(mem)}{refused} | "
                 f"{'yes' if p['fits'] else 'no'} | {best} | {_gib(at)} |")
  return "\n".join(lines)


def missing(data: dict, max_batch: bool) -> list[str]:
  keys = [key(*c) for c in cells()]
  out = [k for k in keys if k not in data["plans"]]
  if max_batch:
    out += [f"{k} (max batch)" for k in keys if k in data["plans"]
            and data["plans"][k]["fits"] and k not in data["max_batch"]]
  return out


def run_cells(data: dict, out: str, only, max_batch: bool) -> None:
  """Every plan first (whole rows early), then the max-batch searches, in preset order."""
  todo = [c for c in cells(only) if key(*c) not in data["plans"]]
  log(f"{len(todo)} plans to compile, {len(data['plans'])} done; writing {out}")
  for i, cell in enumerate(todo):
    log(f"plan {i + 1}/{len(todo)}: {key(*cell)}")
    try:
      data["plans"][key(*cell)] = plan_cell(*cell)
      data["failed"].pop(key(*cell), None)
    except Exception as e:  # noqa: BLE001  keep going; the failure is recorded
      log(f"  FAILED: {type(e).__name__}: {e}")
      data["failed"][key(*cell)] = f"{type(e).__name__}: {e}"[:500]
    save(out, data)
  if not max_batch:
    return
  todo = [c for c in cells(only) if key(*c) in data["plans"]
          and data["plans"][key(*c)]["fits"] and key(*c) not in data["max_batch"]]
  log(f"{len(todo)} max-batch searches to run")
  for i, cell in enumerate(todo):
    log(f"max batch {i + 1}/{len(todo)}: {key(*cell)}")
    try:
      data["max_batch"][key(*cell)] = max_batch_cell(*cell, data["plans"][key(*cell)])
    except Exception as e:  # noqa: BLE001
      log(f"  FAILED: {type(e).__name__}: {e}")
      data["failed"][f"{key(*cell)} (max batch)"] = f"{type(e).__name__}: {e}"[:500]
    save(out, data)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  today = datetime.date.today().isoformat()
  ap.add_argument("--out", default=f"benchmarks/tpu-plan/{today}.json")
  ap.add_argument("--only", default="", help="comma-separated presets")
  ap.add_argument("--no-max-batch", action="store_true", help="plans only")
  ap.add_argument("--table-only", action="store_true", help="print the table from --out")
  args = ap.parse_args()
  command = "python benchmarks/tpu_plan_table.py" + "".join(f" {a}" for a in sys.argv[1:])
  data = load(args.out)
  for part in ("plans", "max_batch", "failed"):
    data.setdefault(part, {})
  if not args.table_only:
    from vesperjax.planning import program
    program.check_target("v5e")
    data.setdefault("runs", []).append(header(
        command, libtpu=importlib.metadata.version("libtpu"), vocab=VOCAB, seq_len=SEQ,
        mem_fraction=MEM_FRACTION, optimizer="velvet", dtype="auto (bf16)",
        note="compiler figures: libtpu's peak memory of deviceless compiles on a CPU "
             "host, never measured on a TPU"))
    only = [p for p in args.only.split(",") if p]
    run_cells(data, args.out, only, not args.no_max_batch)
  runs = data.get("runs", [{}])
  lines = [f"<!-- {runs[-1].get('command', command)} -->", markdown(data)]
  left = missing(data, not args.no_max_batch)
  if left:
    lines += ["", "Not computed yet: " + ", ".join(left) + "."]
  write_markdown(args.out, "\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
