"""The GPU plan table of docs/gpu.md: largest global batch per preset, card and remat policy.

    python benchmarks/gpu_plan_table.py [--out benchmarks/gpu-plan/plan_table.json]
        [--only tiny,small] [--table-only]

Compiler figures from deviceless XLA:GPU compiles (`vesperjax.plan`), not measured runs.
Cells: every preset on 1 device, and large, xlarge, large-moe on 8 devices with FSDP
(mesh.fsdp=8); seq_len 2048 and 512; remat none, full, dots, dots_no_batch; vocab 32768,
bf16 compute (auto on GPU), Velvet, grad_accum 1, default_run_config(preset) otherwise
(scanned layers). Budget: 75% of each card (JAX's default preallocation).

H100-80GB and H200 share one Hopper description apart from memory, so one program has
the same per-device bytes on both: each cell's curve is compiled on h100-80gb
(`program.max_batch`: two compiles, a line, then the prediction and one step above), the
H200 boundary is predicted from those points and confirmed by one compile on the h200
target (more only when that compile disagrees with the line), and once per preset and
mesh the H100 boundary batch is recompiled on h200 to compare the two targets' bytes
for the same program. Results are written after every cell (the run resumes where it
stopped); progress goes to stderr; the markdown table is printed at the end and written
beside the JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling plan_tables

from vesperjax.planning import gpu_targets  # noqa: E402  first: lets the CUDA plugin register
from plan_tables import (GiB, MEM_FRACTION, VOCAB, load, log, save,  # noqa: E402
                         write_markdown)
import plan_tables  # noqa: E402

PRESETS_1 = ("tiny", "small", "tiny-moe", "medium", "medium-moe", "large", "xlarge",
             "large-moe")
PRESETS_8 = ("large", "xlarge", "large-moe")
SEQS = (2048, 512)
POLICIES = ("none", "full", "dots", "dots_no_batch")


def run_config(preset: str, devices: int, seq: int, remat: str = "none"):
  """The RunConfig of one cell (`plan_tables.run_config`: FSDP over several devices)."""
  return plan_tables.run_config(preset, seq, remat, fsdp=devices)


def cells(only=None):
  out = [(p, 1) for p in PRESETS_1] + [(p, 8) for p in PRESETS_8]
  return [(p, n, s, r) for p, n in out if not only or p in only
          for s in SEQS for r in POLICIES]


def key(preset, devices, seq, remat) -> str:
  return f"{preset}|{devices}|{seq}|{remat}"


def line_at(points, batch: int) -> float | None:
  """Bytes at `batch` on the line through the smallest and largest compiled batch (a
  long extrapolation: local steps of the curve must not set its slope)."""
  if len(points) < 2:
    return None
  (b1, m1), (b2, m2) = min(points), max(points)
  return m1 + (m2 - m1) / (b2 - b1) * (batch - b1)


def intercept(points) -> int | None:
  """Bytes at batch 0 on the line through the two smallest compiled batches."""
  if len(points) < 2:
    return None
  (b1, m1), (b2, m2) = sorted(points)[:2]
  return int(m1 - (m2 - m1) / (b2 - b1) * b1)


def one_cell(preset, devices, seq, remat, none_cell: dict | None) -> dict:
  """H100 curve and boundary, then the H200 boundary seeded from it.

  remat none starts from two compiles (divisor, 8 x divisor); the other policies start
  at none's H100 boundary, with none's intercept (the batch-independent bytes: state and
  fixed buffers) as a point at batch 0.
  """
  from vesperjax.planning import program
  run = run_config(preset, devices, seq, remat)
  seed, start = [], None
  if none_cell is not None:
    a = intercept(none_cell["h100-80gb"]["points"])
    seed = [] if a is None else [(0, a)]
    start = none_cell["h100-80gb"]["max_batch"] or None
  t0 = time.time()
  h100 = program.max_batch(run, target="h100-80gb", devices=devices, remat=remat,
                        mem_fraction=MEM_FRACTION, seed=seed, start=start, progress=log)
  if remat == "none":
    h100["intercept_bytes"] = intercept(h100["points"])
  t1 = time.time()
  a = intercept(h100["points"]) if remat == "none" else (seed[0][1] if seed else None)
  h200 = program.max_batch(run, target="h200", devices=devices, remat=remat,
                        mem_fraction=MEM_FRACTION,
                        seed=h100["points"] + ([[0, a]] if a is not None else []),
                        confirm_above=False, progress=log)
  t2 = time.time()
  # the H100 curve's line at the H200 boundary vs what the h200 compile measured there
  if h200["max_batch"]:
    predicted = line_at(h100["points"] + ([[0, a]] if a is not None else []),
                        h200["max_batch"])
    h200["h100_line_bytes"] = None if predicted is None else int(predicted)
  h100["seconds"], h200["seconds"] = round(t1 - t0, 1), round(t2 - t1, 1)
  return {"h100-80gb": h100, "h200": h200}


def same_program_check(preset, devices, seq, h100: dict) -> list[dict]:
  """Recompile the H100 boundary batch (remat none) on h200: same bytes for the same
  program on both targets?"""
  from vesperjax.planning import program
  points = dict(h100["points"])
  batch = h100["max_batch"]
  if batch not in points:
    return []
  run = run_config(preset, devices, seq).replace(train=dict(batch_size=batch))
  got = program.plan_step(run, target="h200", devices=devices, mem_fraction=MEM_FRACTION,
                       progress=log)["per_device_bytes"]["total"]
  return [dict(batch=batch, seq=seq, remat="none", h100_bytes=points[batch],
               h200_bytes=got, same=got == points[batch])]


# The original's README, "Memory & Backend Comparison" (PyTorch VRAM column); its seq_len
# default is 512 and "grad ckpt" is full gradient checkpointing.
ORIGINAL = [  # preset, batch, remat, the original's words
    ("small", 4, "none", "~1GB"),
    ("medium", 8, "none", "~3GB"),
    ("large", 8, "none", "~8GB"),
    ("xlarge", 10, "none", "~18GB"),
    ("xlarge", 32, "full", "~45GB (PyTorch with grad ckpt)"),
]


def original_rows(path: str) -> dict:
  """Plan the original's published memory rows on one H100-80GB at seq 512."""
  from vesperjax.planning import program
  out = load(path)
  for preset, batch, remat, words in ORIGINAL:
    k = f"{preset}|{batch}|{remat}"
    if k in out:
      continue
    run = run_config(preset, 1, 512, remat).replace(train=dict(batch_size=batch))
    p = program.plan_step(run, target="h100-80gb", mem_fraction=MEM_FRACTION, progress=log)
    out[k] = dict(preset=preset, batch=batch, seq=512, remat=remat, original=words,
                  per_device_bytes=p["per_device_bytes"], params_total=p["params_total"],
                  compile_s=p["compile_s"])
    save(path, out)
  return out


def original_markdown(rows: dict) -> str:
  lines = ["| model | batch | original (PyTorch VRAM, its README) | vesperjax plan, 1 x H100 "
           "(seq 512, vocab 32768) | of which state (arguments) |",
           "|---|---:|---|---:|---:|"]
  for preset, batch, remat, words in ORIGINAL:
    r = rows.get(f"{preset}|{batch}|{remat}")
    if r is None:
      continue
    mem = r["per_device_bytes"]
    how = "" if remat == "none" else f", remat {remat}"
    lines.append(f"| {preset} | {batch} | {words} | {mem['total'] / GiB:.1f} GiB{how} | "
                 f"{mem['arguments'] / GiB:.1f} GiB |")
  return "\n".join(lines)


def _cell_text(c: dict) -> str:
  def one(r):
    return "0" if not r["max_batch"] else f"{r['max_batch']}{'+' if r['capped'] else ''}"
  return f"{one(c['h100-80gb'])} / {one(c['h200'])}"


def markdown(data: dict) -> str:
  from vesperjax.config import model_preset
  from vesperjax.model.size import num_params
  rows = []
  head = ("| preset | params | devices | seq | " + " | ".join(POLICIES) + " |\n"
          "|---|---:|---:|---:|" + "---:|" * len(POLICIES))
  groups = []
  for p, n, s, _ in cells():
    if (p, n, s) not in groups:
      groups.append((p, n, s))
  for p, n, s in groups:
    got = [data["cells"].get(key(p, n, s, r)) for r in POLICIES]
    if not any(got):
      continue
    params = num_params(model_preset(p, vocab_size=VOCAB))
    mesh = "1" if n == 1 else f"{n} (fsdp)"
    rows.append(f"| {p} | {params / 1e6:,.0f}M | {mesh} | {s} | " + " | ".join(
        _cell_text(c) if c else "…" for c in got) + " |")
  return head + "\n" + "\n".join(rows)


def gib_table(data: dict) -> str:
  """Per-device GiB at each boundary (H100 / H200) and the compiles each took."""
  lines = ["| cell (preset, devices, seq, remat) | H100: batch (GiB) | H200: batch (GiB) | "
           "compiles H100 + H200 | H200 bytes minus the H100 line |",
           "|---|---|---|---:|---:|"]
  for cell in cells():
    c = data["cells"].get(key(*cell))
    if c is None:
      continue
    a, b = c["h100-80gb"], c["h200"]
    g = lambda r: ("0" if not r["max_batch"] else
                   f"{r['max_batch']} ({r['per_device_bytes'] / GiB:.2f})")
    diff = ""
    if b.get("h100_line_bytes") and b.get("per_device_bytes"):
      diff = f"{(b['per_device_bytes'] - b['h100_line_bytes']) / 2**20:+.0f} MiB"
    lines.append(f"| {' '.join(map(str, cell))} | {g(a)} | {g(b)} | "
                 f"{a['compiles']} + {b['compiles']} | {diff} |")
  return "\n".join(lines)


def same_text(same: dict) -> str:
  checks = [dict(c, cell=k) for k, v in same.items() if isinstance(v, list) for c in v]
  if not checks:
    return "No same-program checks yet."
  parts = [f"{c['cell'].replace('|', ' x')} batch {c['batch']}: "
           f"{c['h100_bytes'] / GiB:.2f} vs {c['h200_bytes'] / GiB:.2f} GiB "
           f"({c['h200_bytes'] - c['h100_bytes']:+,} bytes)" for c in checks]
  equal = sum(c["same"] for c in checks)
  return (f"Same program (seq {SEQS[0]}, remat none) compiled for h100-80gb and h200: "
          f"{equal} of {len(checks)} checks gave equal bytes. " + "; ".join(parts) + ".")


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/gpu-plan/plan_table.json")
  ap.add_argument("--only", default="", help="comma-separated presets")
  ap.add_argument("--table-only", action="store_true", help="print the table from --out")
  ap.add_argument("--original-rows", action="store_true",
                  help="only plan the original README's memory rows (into "
                       "original_rows.json beside --out)")
  args = ap.parse_args()
  command = "python benchmarks/gpu_plan_table.py" + "".join(
      f" {a}" for a in sys.argv[1:])
  data = load(args.out)
  data.setdefault("cells", {})
  data.setdefault("same_program", {})
  only = [p for p in args.only.split(",") if p]
  rows_path = os.path.join(os.path.dirname(args.out), "original_rows.json")
  if args.original_rows:
    original_rows(rows_path)
    args.table_only = True
  if not args.table_only:
    import jax
    from vesperjax.planning import program
    program.check_target("h100-80gb")
    data["meta"] = dict(command=command, jax=jax.__version__, vocab=VOCAB,
                        mem_fraction=MEM_FRACTION, optimizer="velvet", dtype="auto (bf16)",
                        budget_bytes={t: int(MEM_FRACTION * gpu_targets.device_memory_bytes(t))
                                      for t in ("h100-80gb", "h200")},
                        note="compiler figures from deviceless XLA:GPU compiles, not "
                             "measured runs")
    todo = [c for c in cells(only) if key(*c) not in data["cells"]]
    # what users need first: no remat and full remat on one device (none seeds the other
    # policies of its preset and length), then the 8-device FSDP rows, then dots policies
    todo.sort(key=lambda c: (POLICIES.index(c[3]) >= 2, c[1] > 1, POLICIES.index(c[3]),
                             c[2] != SEQS[0]))
    log(f"{len(todo)} cells to do, {len(data['cells'])} done; writing {args.out}")
    start = time.time()
    for i, (p, n, s, r) in enumerate(todo):
      log(f"cell {i + 1}/{len(todo)}: {p} x{n} seq {s} remat {r}")
      try:
        data["cells"][key(p, n, s, r)] = one_cell(
            p, n, s, r, None if r == "none" else data["cells"].get(key(p, n, s, "none")))
      except Exception as e:  # noqa: BLE001  keep going; the failure is recorded
        log(f"  FAILED: {type(e).__name__}: {e}")
        data.setdefault("failed", {})[key(p, n, s, r)] = f"{type(e).__name__}: {e}"[:500]
        save(args.out, data)
        continue
      data.get("failed", {}).pop(key(p, n, s, r), None)
      c = data["cells"][key(p, n, s, r)]
      log(f"  -> {_cell_text(c)} (H100 / H200), {time.time() - start:.0f} s so far")
      pk = f"{p}|{n}"
      if s == SEQS[0] and r == "none" and pk not in data["same_program"]:
        try:
          check = same_program_check(p, n, s, c["h100-80gb"])
        except Exception as e:  # noqa: BLE001
          check = dict(error=f"{type(e).__name__}: {e}"[:300])
        data["same_program"][pk] = check
        log(f"  same program on h200: {check}")
      save(args.out, data)
  table = markdown(data)
  text = "\n".join([
      f"<!-- {data.get('meta', {}).get('command', command)} -->",
      "Largest global batch, H100-80GB / H200 (1 device unless noted), at 75% of the card:",
      "", table, "", same_text(data["same_program"]), "",
      "<details><summary>per-device GiB at the boundary</summary>", "", gib_table(data),
      "", "</details>", "", "The original's published memory rows beside the plan:", "",
      original_markdown(load(rows_path))])
  print(command)
  write_markdown(args.out, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
