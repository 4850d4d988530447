"""The optimizer sweep: Velvet vs AdamW on the same data, model init and batches, each
over a learning-rate sweep and several seeds, judged by held-out validation loss.

(The original compared Velvet at 1.5x AdamW's LR and beta1 0.95 vs 0.9, which mixes the
optimizer with its tuning.) The arms (`ARMS`) are Velvet, AdamW, AdamW at the beta1
Velvet's perplexity rule gives while clipped, and Velvet with one rule or none. Each run
uses the trainer's own jit train/eval steps (`build.build_model`) on one device.
`run_optimizers` writes WORKDIR/benchmark_report.json after every run and keeps the
finished runs of an interrupted sweep; `summarize` reads the report (`bench.tables`
formats it).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import platform
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # jax-free until a benchmark runs
  from vesperjax.run_config import RunConfig

OPTIMIZERS = ("velvet", "adamw")  # the default arms


def _clipped_b1(optim) -> float:
  """Velvet's beta1 while its perplexity scale sits at the lower clip (perplexity > 57)."""
  from vesperjax.optim.velvet_rules import B1_MAX, B1_MIN, SCALE_MIN
  return float(min(max(optim.b1 * SCALE_MIN, B1_MIN), B1_MAX))


def _velvet_rules(spec: str):
  return lambda o: dict(name="velvet", velvet_rules=spec)


# Arm name -> the `config.optim` fields it runs with (a function of the run's optim).
ARMS = {
    "velvet": lambda o: dict(name="velvet"),
    "adamw": lambda o: dict(name="adamw"),
    "adamw-clipped-b1": lambda o: dict(name="adamw", b1=_clipped_b1(o)),
    "velvet-entropy": lambda o: dict(name="velvet", perplexity_guided=False),
    "velvet-perplexity": lambda o: dict(name="velvet", entropy_adaptive=False),
    # both rules off: AdamW plus Velvet's sparse-aware rule (zero gradients, no update)
    "velvet-rules-off": lambda o: dict(name="velvet", entropy_adaptive=False,
                                       perplexity_guided=False),
    # the original's perplexity-rule cost, one cause at a time (velvet_rules.py)
    "velvet-product-bc": _velvet_rules("original:bias_correction=product"),
    "velvet-smoothed": _velvet_rules("original:signal_decay=0.98"),
    "velvet-horizon": _velvet_rules("original:b1_rule=horizon"),
    "velvet-trend": _velvet_rules("original:perplexity_signal=trend,signal_decay=0.98"),
    **{f"velvet-b1max-{c}": _velvet_rules(f"original:b1_max={c}")
       for c in ("0.9", "0.95", "0.98")},
    "velvet-corrected": _velvet_rules("corrected"),
    # the field: what a JAX user would pick instead (optim/field.py)
    "muon": lambda o: dict(name="muon"),
    "schedule-free-adamw": lambda o: dict(name="schedule_free_adamw"),
    "ademamix": lambda o: dict(name="ademamix"),
    "adamw-entropy-lr": lambda o: dict(name="adamw", entropy_lr=True),
    "muon-entropy-lr": lambda o: dict(name="muon", entropy_lr=True),
}
# Per-step metrics kept in the report (when the optimizer produces them).
CURVES = ("loss", "entropy", "grad_norm", "learning_rate", "b1", "entropy_scale",
          "perplexity_scale")


def _variant(run: RunConfig, arm: str, lr: float, steps: int) -> RunConfig:
  """The run with arm `arm` at peak LR `lr`, scheduled over `steps`."""
  return run.replace(optim=dict(ARMS[arm](run.optim), lr=float(lr)),
                     train=dict(max_steps=steps))


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
  # 5 significant digits: long sweeps keep every step's value in a report of a few MB
  curves = {k: [float(f"{float(m[k]):.5g}") for m in host] for k in CURVES if k in host[0]}
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
                   steps: int, optimizers=OPTIMIZERS, log=print, top_lrs: int = 0,
                   bracket: int = 0) -> dict:
  """The full sweep; returns (and writes) the report.

  The report is rewritten after every run. Runs already in WORKDIR's report of the same
  config and steps are kept, not rerun (same batches and init: they would be identical),
  and so are its other arms, LRs and seeds; a report of another config is refused
  rather than overwritten.

  The study protocol: `top_lrs=K` runs every LR at the first seed and the other seeds
  only at each arm's K best LRs of that seed; `bracket=N` first grows an arm's LR grid
  (by the grid's own ratio, at most N times) while its first seed's best LR sits at the
  grid's edge, so every optimum ends up bracketed.
  """
  import jax

  from vesperjax.training import build
  from vesperjax import data as vdata
  from vesperjax import sharding

  t = run.train
  seq_len = run.data.seq_len
  os.makedirs(workdir, exist_ok=True)
  path = report_path(workdir)
  done, started = _finished_runs(path, run, steps)
  data = build.prepare_data(run, workdir, progress=False)
  if data.val_cache is None:
    raise ValueError("the optimizer benchmark judges by validation loss, but the data has "
                     "no validation split (raise config.data.val_percent or set "
                     "config.data.val_dataset)")
  vocab = data.tokenizer.vocab_size
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  eval_every = min(t.eval_every, steps)
  report = dict(
      command="optimizers", config=run.to_dict(), vocab=vocab, steps=steps,
      seeds=seeds, lrs=[float(x) for x in lrs], optimizers=list(optimizers),
      device=f"{jax.default_backend()}: {jax.devices()[0].device_kind}",
      machine=f"{platform.machine()}, {os.cpu_count()} CPUs", jax=jax.__version__,
      started=started or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), runs=[])
  commit = source_commit()
  # An earlier report's runs all stay in the report, written after every new run: a
  # sweep can grow, and one stopped before it reaches an arm loses none of its runs.
  report["runs"] = list(done.values())
  report["optimizers"] = list(dict.fromkeys([a for a, _, _ in done] + list(optimizers)))
  report["seeds"] = max([seeds] + [s + 1 for _, _, s in done])
  report["lrs"] = sorted(set(report["lrs"]) | {lr for _, lr, _ in done})
  report["arms"] = {a: ARMS[a](run.optim) for a in report["optimizers"]}
  inputs = {}  # built with the first model: the batches and validation data

  def batches_and_eval(steps_fn):
    if not inputs:
      inputs["eval"] = [jax.device_put(b.astype(np.int32), steps_fn.eval_sharding)
                        for b in vdata.eval_batches(data.val_cache, t.batch_size, seq_len,
                                                    max(t.eval_batches, 1))]
      for s in range(seeds):  # the same batches for every arm and LR of a seed
        it = vdata.train_iterator(data.train_cache, seq_len, t.batch_size, seed=t.seed + s)
        inputs[s] = [jax.device_put(np.stack([next(it) for _ in range(t.grad_accum)])
                                    .astype(np.int32), steps_fn.batch_sharding)
                     for _ in range(steps)]
    return inputs

  def runs_of(arm, lr, seed_list):
    """Run (or take from the old report) `arm` at `lr` for `seed_list`."""
    todo = [s for s in seed_list
            if (arm, float(lr), s) not in done and not _listed(report, arm, lr, s)]
    report["runs"] += [done[(arm, float(lr), s)] for s in seed_list
                       if (arm, float(lr), s) in done
                       and not _listed(report, arm, lr, s)]
    if todo:
      run_seeds(arm, lr, todo)

  def run_seeds(arm, lr, todo):
    model = build.build_model(_variant(run, arm, lr, steps), mesh,
                              vocab_size=vdata.padded_vocab_size(vocab),
                              valid_vocab=vocab)
    report.setdefault("model", model.config.to_dict())
    io = batches_and_eval(model.steps)
    for s in todo:
      start = time.perf_counter()
      curves, evals, times = _run_one(model.steps, jax.random.key(t.seed + s), io[s],
                                      io["eval"], eval_every, model.lr)
      took = time.perf_counter() - start
      steady = (took - times[0]) / max(steps - 1, 1)
      report["runs"].append(dict(
          optimizer=arm, lr=float(lr), seed=s, curves=curves, evals=evals,
          final_val_loss=evals[-1][1], final_train_loss=_tail_mean(curves["loss"]),
          first_step_s=times[0], step_s=steady, wall_s=took, commit=commit,
          date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
      log(f"{arm:>17} lr={lr:<9.3g} seed={s}: val {evals[-1][1]:.4f}  train "
          f"{report['runs'][-1]['final_train_loss']:.4f}  ({took:.1f} s)")
      write_report(path, report)

  for arm in optimizers:
    if not top_lrs and not bracket:
      for lr in lrs:
        runs_of(arm, lr, range(seeds))
      continue
    grid = sorted(float(x) for x in lrs)
    for lr in grid:
      runs_of(arm, lr, [0])
    ratio = grid[-1] / grid[-2]
    for _ in range(bracket):
      first = {lr: _val(report, arm, lr, 0) for lr in grid}
      best = min(first, key=first.get)
      if grid[0] < best < grid[-1]:
        break
      new = best * ratio if best == grid[-1] else best / ratio
      log(f"{arm}: best first-seed LR {best:.3g} at the grid's edge; adding {new:.3g}")
      grid = sorted(grid + [new])
      runs_of(arm, new, [0])
    first = {lr: _val(report, arm, lr, 0) for lr in grid}
    for lr in sorted(grid, key=first.get)[:top_lrs or len(grid)]:
      runs_of(arm, lr, range(seeds))
  report["lrs"] = sorted({float(r["lr"]) for r in report["runs"]} | set(report["lrs"]))
  if inputs:
    report["eval_tokens"] = int(sum(b.size for b in inputs["eval"]))
  report["wall_s"] = float(sum(r["wall_s"] for r in report["runs"]))
  report["summary"] = summarize(report)
  write_report(path, report)
  return report


def source_commit() -> str | None:
  """`git describe --always --dirty` of the checkout vesperjax runs from (None for an
  installed wheel): a report that grows over sessions records it per run."""
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"],
                         capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def _listed(report: dict, arm: str, lr: float, seed: int) -> bool:
  return any(r["optimizer"] == arm and r["lr"] == float(lr) and r["seed"] == seed
             for r in report["runs"])


def _val(report: dict, arm: str, lr: float, seed: int) -> float:
  """A run's final validation loss; inf for a diverged (non-finite) one."""
  v = next(r["final_val_loss"] for r in report["runs"] if r["optimizer"] == arm
           and r["lr"] == float(lr) and r["seed"] == seed)
  return v if math.isfinite(v) else math.inf


def report_path(workdir: str) -> str:
  """WORKDIR/benchmark_report.json, or its gzipped form where only that exists (a long
  study's report is committed gzipped and keeps growing in that form)."""
  path = os.path.join(workdir, "benchmark_report.json")
  return path + ".gz" if os.path.exists(path + ".gz") and not os.path.exists(path) else path


def read_report(path: str) -> dict:
  """A report, plain or gzipped (by its suffix); a damaged one is a one-line ValueError."""
  try:
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
      return json.load(f)
  except (OSError, EOFError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not a readable JSON report ({e})") from None


def write_report(path: str, report: dict) -> None:
  """Write `report` to `path` (gzipped for a .gz path) through a temporary file, so an
  interrupted write leaves the previous report whole."""
  tmp = path + ".tmp"
  with (gzip.open(tmp, "wt") if path.endswith(".gz") else open(tmp, "w")) as f:
    json.dump(report, f, separators=(",", ":"))
  os.replace(tmp, path)


def _finished_runs(path: str, run: RunConfig, steps: int) -> tuple[dict, str | None]:
  """(arm, lr, seed) -> run of WORKDIR's existing report, if it is of this benchmark,
  and when that report was started."""
  if not os.path.exists(path):
    return {}, None
  try:
    old = read_report(path)
  except ValueError as e:
    raise ValueError(f"{e}; move it away or choose another --workdir") from None
  same_config = old.get("config") == _as_old(json.loads(json.dumps(run.to_dict())),
                                            old.get("config") or {})
  if not same_config or old.get("steps") != steps:
    raise ValueError(f"{path} is a report of another config or step count; choose "
                     "another --workdir (its runs are kept, not overwritten)")
  return ({(r["optimizer"], float(r["lr"]), int(r["seed"])): r for r in old["runs"]},
          old.get("started"))


def _as_old(config: dict, old: dict) -> dict:
  """`config` without the keys an older report's config lacks that hold their default
  (keys added since): such a report is still of the same benchmark."""
  from vesperjax.run_config import RunConfig
  default = RunConfig().to_dict()
  return {sec: {k: v for k, v in vals.items()
                if k in old.get(sec, {}) or v != default.get(sec, {}).get(k)}
          if isinstance(vals, dict) else vals for sec, vals in config.items()}


def _tail_mean(xs, frac: float = 0.1) -> float:
  """Mean of the last 10% of a noisy training-loss curve (at least one point)."""
  n = max(1, int(len(xs) * frac))
  return float(np.mean(xs[-n:]))


def summarize(report: dict) -> dict:
  """Per (arm, lr): mean/std over seeds; each arm's best LR and whether the grid brackets
  it; every arm against the best AdamW; where Velvet's scales leave their clips."""
  rows = []
  for name in report["optimizers"]:
    for lr in report["lrs"]:
      rs = [r for r in report["runs"] if r["optimizer"] == name and r["lr"] == float(lr)]
      if not rs:
        continue
      val = np.array([r["final_val_loss"] for r in rs])
      train = np.array([r["final_train_loss"] for r in rs])
      rows.append(dict(optimizer=name, lr=float(lr), seeds=len(rs),
                       val_mean=float(val.mean()),
                       val_std=float(val.std()), train_mean=float(train.mean()),
                       train_std=float(train.std()),
                       step_s=float(np.median([r["step_s"] for r in rs]))))
  best, bracketed = {}, {}
  for name in report["optimizers"]:
    mine = [r for r in rows if r["optimizer"] == name and math.isfinite(r["val_mean"])]
    # the best among the LRs run with the most seeds (the study protocol runs the other
    # seeds only at the first seed's best LRs)
    mine = [r for r in mine if r["seeds"] == max(x["seeds"] for x in mine)]
    if mine:
      best[name] = min(mine, key=lambda r: r["val_mean"])
      grid = [r["lr"] for r in rows if r["optimizer"] == name]
      bracketed[name] = min(grid) < best[name]["lr"] < max(grid)
  out = dict(table=rows, best=best, bracketed=bracketed, vs_adamw_pct={},
             exceeds_seed_std={}, clip_exits={})
  if "adamw" in best:
    a = best["adamw"]
    for name, b in best.items():
      if name != "adamw":
        out["vs_adamw_pct"][name] = 100.0 * (b["val_mean"] - a["val_mean"]) / a["val_mean"]
        # within noise when the gap is smaller than the seeds' spread
        out["exceeds_seed_std"][name] = bool(
            abs(b["val_mean"] - a["val_mean"]) > max(b["val_std"], a["val_std"]))
  if "velvet" in out["vs_adamw_pct"]:  # the headline, under its earlier keys
    out["velvet_vs_adamw_best_val_pct"] = out["vs_adamw_pct"]["velvet"]
    out["gap_exceeds_seed_std"] = out["exceeds_seed_std"]["velvet"]
  for name, b in best.items():
    rs = [r for r in report["runs"] if r["optimizer"] == name and r["lr"] == b["lr"]]
    events = clip_exits(rs, window=max(1, report["steps"] // 20)) if rs else {}
    if events:  # an arm with a Velvet rule on
      out["clip_exits"][name] = events
  return out


# (curve, clip, event): the entropy scale starts at its upper clip (entropy near ln V),
# the perplexity scale at its lower one (perplexity > 57); each may leave it and reach
# the other; beta1 reaches its 0.999 cap once ps >= 1.11 (perplexity < 36).
_CLIP_EVENTS = (("entropy_scale", "max", "leaves"), ("entropy_scale", "min", "reaches"),
                ("perplexity_scale", "min", "leaves"),
                ("perplexity_scale", "max", "reaches"), ("b1", "cap", "reaches"))


def clip_exits(runs: list[dict], window: int, tol: float = 1e-3) -> dict:
  """Where Velvet's scales sit at their clips. Per step each scale follows its batch's
  loss or entropy, so events are read from the share of the last `window` steps at a
  clip: a scale *leaves* a clip at the first step where under half of them are at it,
  and *reaches* one where at least half are. For each event: the step and the
  moving-average training loss there (means over the runs where it happens, and how
  many those are); for each clip, the share of all steps at it and of the last fifth.
  A scale whose rule is off (always 1) is left out."""
  from vesperjax.optim.velvet_rules import B1_MAX, SCALE_MAX, SCALE_MIN
  bound = dict(max=SCALE_MAX, min=SCALE_MIN, cap=B1_MAX)
  out = {}
  for key, clip, event in _CLIP_EVENTS:
    ys = [np.asarray(r["curves"][key], float) for r in runs if key in r["curves"]]
    rule = "perplexity_scale" if key == "b1" else key  # b1 follows the perplexity rule
    if not ys or all(np.all(np.asarray(r["curves"].get(rule, 1.0)) == 1.0) for r in runs):
      continue
    hits, shares = [], []
    for r, y in zip(runs, ys):
      at = np.abs(y - bound[clip]) <= tol
      share = moving_mean(at, window)
      crossed = share < 0.5 if event == "leaves" else share >= 0.5
      if crossed.any():
        i = int(np.argmax(crossed))
        hits.append((i + 1, float(moving_mean(r["curves"]["loss"], window)[i])))
      shares.append((float(at.mean()), float(at[-max(1, len(at) // 5):].mean())))
    out[f"{key}_{event}_{clip}"] = dict(
        step=float(np.mean([h[0] for h in hits])) if hits else None,
        loss=float(np.mean([h[1] for h in hits])) if hits else None,
        seeds=len(hits), of=len(runs), share_at_clip=float(np.mean(shares, 0)[0]),
        share_at_clip_last_fifth=float(np.mean(shares, 0)[1]))
  return out


def moving_mean(y, window: int) -> np.ndarray:
  """Trailing moving average (over fewer points at the start), as long as `y`."""
  y = np.asarray(y, float)
  c = np.cumsum(np.insert(y, 0, 0.0))
  n = np.minimum(np.arange(1, len(y) + 1), window)
  return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n
