"""The optimizer sweep's tables: the terminal table `format_table` (every arm and LR, the
clip events) and `markdown_table`, the study's one-row-per-arm table for the docs."""
from __future__ import annotations

import math


def format_table(summary: dict) -> str:
  """The sweep's table, each arm against the best AdamW, and the clip events."""
  lines = [f"{'arm':<17} {'lr':>9} {'val loss':>17} {'val ppl':>9} "
           f"{'train loss':>17} {'s/step':>7}"]
  for r in summary["table"]:
    mark = " *" if summary["best"].get(r["optimizer"], {}).get("lr") == r["lr"] else ""
    lines.append(f"{r['optimizer']:<17} {r['lr']:>9.3g} {r['val_mean']:>9.4f} ± "
                 f"{r['val_std']:<5.3f} {math.exp(min(r['val_mean'], 50)):>9.2f} "
                 f"{r['train_mean']:>9.4f} ± {r['train_std']:<5.3f} {r['step_s']:>7.3f}"
                 f"{mark}")
  lines.append("* = each arm's best LR")
  for name, pct in summary.get("vs_adamw_pct", {}).items():
    noise = "" if summary["exceeds_seed_std"][name] else " (within the seeds' spread)"
    lines.append(f"best {name} vs best adamw validation loss: {pct:+.2f}%{noise}")
  edge = [n for n, ok in summary.get("bracketed", {}).items() if not ok]
  if edge:
    lines.append(f"best LR at the grid's edge (optimum not bracketed): {', '.join(edge)}")
  for name, events in summary.get("clip_exits", {}).items():
    lines.append(f"{name} at its best LR (a clip is left / reached where half the "
                 "steps of a moving window are off / at it):")
    for event, e in events.items():
      where = ("never" if e["step"] is None else f"at step {e['step']:.0f}, loss "
               f"{e['loss']:.2f} ({e['seeds']}/{e['of']} seeds)")
      lines.append(f"  {event.replace('_', ' ')} {where}; steps at that clip: "
                   f"{e['share_at_clip']:.0%} (last fifth "
                   f"{e['share_at_clip_last_fifth']:.0%})")
  return "\n".join(lines)


def markdown_table(summary: dict) -> str:
  """One row per arm at its best LR: val loss mean +- std over the seeds, against the
  best AdamW, and whether the gap exceeds the seeds' spread (docs/benchmarks.md)."""
  best = summary.get("best", {})
  rows = ["| arm | best LR | seeds | val loss | vs best AdamW | beyond the seeds' spread |",
          "|---|---|---|---|---|---|"]
  for name, b in sorted(best.items(), key=lambda kv: kv[1]["val_mean"]):
    pct = summary.get("vs_adamw_pct", {}).get(name)
    gap = "" if pct is None else f"{pct:+.2f}%"
    beyond = "" if pct is None else ("yes" if summary["exceeds_seed_std"][name] else "no")
    edge = "" if summary.get("bracketed", {}).get(name, True) else " (grid edge)"
    rows.append(f"| {name} | {b['lr']:.3g}{edge} | {b.get('seeds', '')} | "
                f"{b['val_mean']:.3f} ± {b['val_std']:.3f} | {gap} | {beyond} |")
  return "\n".join(rows)


def first_seed_grid(report: dict, seed: int = 0) -> str:
  """Every arm's validation loss at each LR of its sweep for one seed (the study's
  first stage, before the other seeds), best per arm in bold; `-` where not run."""
  runs = [r for r in report["runs"] if r["seed"] == seed]
  lrs = sorted({r["lr"] for r in runs})
  rows = ["| arm \\ peak LR | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |",
          "|---|" + "---|" * len(lrs)]
  for arm in dict.fromkeys(r["optimizer"] for r in runs):
    vals = {r["lr"]: r["final_val_loss"] for r in runs if r["optimizer"] == arm}
    finite = [v for v in vals.values() if math.isfinite(v)]
    best = min(finite) if finite else None
    cells = ["-" if lr not in vals else
             (f"**{vals[lr]:.3f}**" if vals[lr] == best else f"{vals[lr]:.3f}")
             for lr in lrs]
    rows.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(rows)
