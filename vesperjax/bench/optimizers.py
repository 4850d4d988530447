"""The optimizer sweep: Velvet vs AdamW on the same data, model init and batches, each
over a learning-rate sweep and several seeds, judged by held-out validation loss.

(The original compared Velvet at 1.5x AdamW's LR and beta1 0.95 vs 0.9, which mixes the
optimizer with its tuning.) Each run uses the trainer's own jit train/eval steps
(`build.build_model`) on one device. `run_optimizers` writes WORKDIR/benchmark_report.json;
`summarize` and `format_table` read it.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # jax-free until a benchmark runs
  from vesperjax.run_config import RunConfig

OPTIMIZERS = ("velvet", "adamw")
# Per-step metrics kept in the report (when the optimizer produces them).
CURVES = ("loss", "entropy", "grad_norm", "learning_rate", "b1", "entropy_scale",
          "perplexity_scale")


def _variant(run: RunConfig, name: str, lr: float, steps: int) -> RunConfig:
  """The run with optimizer `name` at peak LR `lr`, scheduled over `steps`."""
  return run.replace(optim=dict(name=name, lr=float(lr)), train=dict(max_steps=steps))


def _run_one(steps, seed_key, batches, eval_data, eval_every, schedule):
  """Train one (optimizer, lr, seed) with `steps` (a ShardedSteps); per-step curves,
  evals and the first two steps' times."""
  import jax

  state = steps.init(seed_key)
  evals = [(0, _evaluate(steps.eval_step, state, eval_data))]
  metrics, step_times = [], []
  for i, batch in enumerate(batches, start=1):
    start = time.perf_counter()
    state, m = steps.train_step(state, batch)
    metrics.append({k: m[k] for k in CURVES if k in m})
    if i <= 2:  # the first call compiles: time it apart
      jax.block_until_ready(m["loss"])
      step_times.append(time.perf_counter() - start)
    if i % eval_every == 0 or i == len(batches):
      evals.append((i, _evaluate(steps.eval_step, state, eval_data)))
  jax.block_until_ready(state)
  host = jax.device_get(metrics)
  curves = {k: [float(m[k]) for m in host] for k in CURVES if k in host[0]}
  if "learning_rate" not in curves:  # adamw: the schedule's value at each step
    curves["learning_rate"] = [float(schedule(i)) for i in range(len(host))]
  return curves, evals, step_times


def _evaluate(eval_fn, state, eval_data) -> float:
  total = count = 0.0
  for tokens in eval_data:
    s, n = eval_fn(state, tokens)
    total, count = total + float(s), count + float(n)
  return total / count


def run_optimizers(run: RunConfig, workdir: str, *, seeds: int, lrs: list[float],
                   steps: int, optimizers=OPTIMIZERS, log=print) -> dict:
  """The full sweep; returns (and writes) the report."""
  import jax

  from vesperjax import build
  from vesperjax import data as vdata
  from vesperjax import sharding

  t = run.train
  seq_len = run.data.seq_len
  os.makedirs(workdir, exist_ok=True)
  data = build.prepare_data(run, workdir, progress=False)
  if data.val_cache is None:
    raise ValueError("the optimizer benchmark judges by validation loss, but the data has "
                     "no validation split (raise config.data.val_percent or set "
                     "config.data.val_dataset)")
  vocab = data.tokenizer.vocab_size
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  models = {(name, lr): build.build_model(_variant(run, name, lr, steps), mesh,
                                          vocab_size=vdata.padded_vocab_size(vocab),
                                          valid_vocab=vocab)
            for name in optimizers for lr in lrs}
  first = next(iter(models.values())).steps  # all share the one mesh's shardings
  eval_every = min(t.eval_every, steps)
  eval_data = [jax.device_put(b.astype(np.int32), first.eval_sharding)
               for b in vdata.eval_batches(data.val_cache, t.batch_size, seq_len,
                                           max(t.eval_batches, 1))]

  # The same batches for every optimizer and LR of a seed: drawn once, up front.
  batches = {}
  for s in range(seeds):
    it = vdata.train_iterator(data.train_cache, seq_len, t.batch_size, seed=t.seed + s)
    batches[s] = [jax.device_put(np.stack([next(it) for _ in range(t.grad_accum)])
                                 .astype(np.int32), first.batch_sharding)
                  for _ in range(steps)]

  runs = []
  for (name, lr), model in models.items():
    for s in range(seeds):
      start = time.perf_counter()
      curves, evals, times = _run_one(model.steps, jax.random.key(t.seed + s), batches[s],
                                      eval_data, eval_every, model.lr)
      took = time.perf_counter() - start
      steady = (took - times[0]) / max(steps - 1, 1)
      runs.append(dict(optimizer=name, lr=float(lr), seed=s, curves=curves,
                       evals=evals, final_val_loss=evals[-1][1],
                       final_train_loss=_tail_mean(curves["loss"]),
                       first_step_s=times[0], step_s=steady, wall_s=took))
      log(f"{name:>6} lr={lr:<9.3g} seed={s}: val {evals[-1][1]:.4f}  train "
          f"{runs[-1]['final_train_loss']:.4f}  ({took:.1f} s)")

  config = next(iter(models.values())).config  # one model, several optimizers
  report = dict(
      command="optimizers", config=run.to_dict(),
      model=config.to_dict(), vocab=vocab, steps=steps, seeds=seeds,
      lrs=list(lrs), optimizers=list(optimizers),
      eval_tokens=int(sum(b.size for b in eval_data)) or None,
      device=f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
      jax=jax.__version__, runs=runs)
  report["summary"] = summarize(report)
  path = os.path.join(workdir, "benchmark_report.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=1)
  os.replace(path + ".tmp", path)
  return report


def _tail_mean(xs, frac: float = 0.1) -> float:
  """Mean of the last 10% of a noisy training-loss curve (at least one point)."""
  n = max(1, int(len(xs) * frac))
  return float(np.mean(xs[-n:]))


def summarize(report: dict) -> dict:
  """Per (optimizer, lr): mean/std over seeds; each optimizer's best LR; the verdict."""
  rows = []
  for name in report["optimizers"]:
    for lr in report["lrs"]:
      rs = [r for r in report["runs"] if r["optimizer"] == name and r["lr"] == float(lr)]
      if not rs:
        continue
      val = np.array([r["final_val_loss"] for r in rs])
      train = np.array([r["final_train_loss"] for r in rs])
      rows.append(dict(optimizer=name, lr=float(lr), val_mean=float(val.mean()),
                       val_std=float(val.std()), train_mean=float(train.mean()),
                       train_std=float(train.std()),
                       step_s=float(np.median([r["step_s"] for r in rs]))))
  best = {}
  for name in report["optimizers"]:
    mine = [r for r in rows if r["optimizer"] == name and math.isfinite(r["val_mean"])]
    if mine:
      best[name] = min(mine, key=lambda r: r["val_mean"])
  out = dict(table=rows, best=best)
  if "velvet" in best and "adamw" in best:
    v, a = best["velvet"]["val_mean"], best["adamw"]["val_mean"]
    out["velvet_vs_adamw_best_val_pct"] = 100.0 * (v - a) / a
    # Within noise when the gap is smaller than the seeds' spread.
    spread = max(best["velvet"]["val_std"], best["adamw"]["val_std"])
    out["gap_exceeds_seed_std"] = bool(abs(v - a) > spread)
  return out


def format_table(summary: dict) -> str:
  lines = [f"{'optimizer':<9} {'lr':>9} {'val loss':>17} {'val ppl':>9} "
           f"{'train loss':>17} {'s/step':>7}"]
  for r in summary["table"]:
    mark = " *" if summary["best"].get(r["optimizer"]) is r or (
        summary["best"].get(r["optimizer"], {}).get("lr") == r["lr"]) else ""
    lines.append(f"{r['optimizer']:<9} {r['lr']:>9.3g} {r['val_mean']:>9.4f} ± "
                 f"{r['val_std']:<5.3f} {math.exp(min(r['val_mean'], 50)):>9.2f} "
                 f"{r['train_mean']:>9.4f} ± {r['train_std']:<5.3f} {r['step_s']:>7.3f}"
                 f"{mark}")
  if "velvet_vs_adamw_best_val_pct" in summary:
    pct = summary["velvet_vs_adamw_best_val_pct"]
    noise = "" if summary["gap_exceeds_seed_std"] else " (within the seeds' spread)"
    lines.append(f"best Velvet vs best AdamW validation loss: {pct:+.2f}%{noise}  "
                 "(* = each optimizer's best LR)")
  return "\n".join(lines)
