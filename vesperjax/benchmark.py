"""`python -m vesperjax.benchmark {optimizers,throughput,plot} --config FILE [...]`.

optimizers: Velvet vs AdamW on the same data, the same model init and the same batches,
  each over a learning-rate sweep (the original compared Velvet at 1.5x AdamW's LR and
  beta1 0.95 vs 0.9, which mixes the optimizer with its tuning), several seeds, judged by
  held-out validation loss. Runs the trainer's own jit train/eval steps on one device.
  Writes WORKDIR/benchmark_report.json and WORKDIR/plots/*.png, prints a table.
throughput: times the trainer's jit train step (after compiling it) on synthetic
  tokens of the model's vocabulary (no data, no tokenizer) on the run's mesh; prints
  one JSON line.
plot: redraws the plots of a report: `plot --report WORKDIR/benchmark_report.json`.

`--config.key=value` overrides apply as in `vesperjax.train`. Bad input ends with one
`error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from vesperjax.cli import load_run_config, run_cli

COMMANDS = ("optimizers", "throughput", "plot")
OPTIMIZERS = ("velvet", "adamw")

# Own FlagValues: vesperjax.train defines --config/--workdir on the global FLAGS and
# tests import both modules into one process.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          flag_values=FLAGS, lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "optimizers: output directory (default: "
                               "runs/benchmark-<config name>).", flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer("seeds", 2, "optimizers: seeds (model init + data order).",
                              flag_values=FLAGS)
_LRS = flags.DEFINE_list("lrs", None, "optimizers: peak learning rates to sweep, for "
                         "every optimizer (default: 0.5x, 1x, 2x config.optim.lr).",
                         flag_values=FLAGS)
_OPTIMIZERS = flags.DEFINE_list("optimizers", list(OPTIMIZERS), "optimizers: which "
                                "(velvet, adamw).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "optimizers: training steps per run "
                              "(default config.train.max_steps); throughput: timed steps "
                              "(default 10).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch-size", None, "throughput: global batch (default "
                              "config.train.batch_size).", flag_values=FLAGS)
_SEQ = flags.DEFINE_integer("seq-len", None, "throughput: sequence length (default "
                            "config.data.seq_len).", flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "throughput: untimed steps after compiling.",
                               flag_values=FLAGS)
_REPORT = flags.DEFINE_string("report", None, "plot: a benchmark_report.json.",
                              flag_values=FLAGS)

# Per-step metrics kept in the report (when the optimizer produces them).
_CURVES = ("loss", "entropy", "grad_norm", "learning_rate", "b1", "entropy_scale",
           "perplexity_scale")


# ---------------------------------------------------------------------------------------
# optimizers


def _optim_config(run, name: str, lr: float):
  optim = run.optim.copy_and_resolve_references()
  with optim.unlocked():
    optim.name, optim.lr = name, float(lr)
  return optim


def _run_one(step_fn, eval_fn, init_fn, seed_key, batches, eval_data, eval_every,
             schedule):
  """Train one (optimizer, lr, seed); per-step curves, evals and timing."""
  import jax

  state = init_fn(seed_key)
  evals = [(0, _evaluate(eval_fn, state, eval_data))]
  metrics, step_times = [], []
  for i, batch in enumerate(batches, start=1):
    start = time.perf_counter()
    state, m = step_fn(state, batch)
    metrics.append({k: m[k] for k in _CURVES if k in m})
    if i <= 2:  # the first call compiles: time it apart
      jax.block_until_ready(m["loss"])
      step_times.append(time.perf_counter() - start)
    if i % eval_every == 0 or i == len(batches):
      evals.append((i, _evaluate(eval_fn, state, eval_data)))
  jax.block_until_ready(state)
  host = jax.device_get(metrics)
  curves = {k: [float(m[k]) for m in host] for k in _CURVES if k in host[0]}
  if "learning_rate" not in curves:  # adamw: the schedule's value at each step
    curves["learning_rate"] = [float(schedule(i)) for i in range(len(host))]
  return curves, evals, step_times


def _evaluate(eval_fn, state, eval_data) -> float:
  total = count = 0.0
  for tokens in eval_data:
    s, n = eval_fn(state, tokens)
    total, count = total + float(s), count + float(n)
  return total / count


def run_optimizers(run, workdir: str, *, seeds: int, lrs: list[float], steps: int,
                   optimizers=OPTIMIZERS, log=print) -> dict:
  """The full sweep; returns (and writes) the report."""
  import jax

  from vesperjax import data as vdata
  from vesperjax.run_config import model_config
  from vesperjax.train_step import (init_state_fn, lr_schedule, make_eval_step,
                                    make_optimizer, make_train_step)

  t, d = run.train, run.data
  os.makedirs(workdir, exist_ok=True)
  train_cache, val_cache, tok = vdata.prepare_train_val(
      d.dataset, d.tokenizer, d.cache_dir or os.path.join(workdir, "data"),
      val_dataset=d.val_dataset, text_field=d.text_field, val_percent=d.val_percent,
      progress=False)
  if val_cache is None:
    raise ValueError("the optimizer benchmark judges by validation loss, but the data has "
                     "no validation split (raise config.data.val_percent or set "
                     "config.data.val_dataset)")
  config = model_config(run, vdata.padded_vocab_size(tok.vocab_size))
  if d.seq_len > config.max_seq_len:
    raise ValueError(f"config.data.seq_len={d.seq_len} exceeds max_seq_len="
                     f"{config.max_seq_len}")
  vocab = tok.vocab_size
  eval_every = min(t.eval_every, steps)
  device = jax.devices()[0]
  eval_data = [jax.device_put(b.astype(np.int32), device) for b in vdata.eval_batches(
      val_cache, t.batch_size, d.seq_len, max(t.eval_batches, 1))]

  # The same batches for every optimizer and LR of a seed: drawn once, up front.
  batches = {}
  for s in range(seeds):
    it = vdata.train_iterator(train_cache, d.seq_len, t.batch_size, seed=t.seed + s)
    batches[s] = [jax.device_put(np.stack([next(it) for _ in range(t.grad_accum)])
                                 .astype(np.int32), device) for _ in range(steps)]

  runs = []
  for name in optimizers:
    for lr in lrs:
      optim = _optim_config(run, name, lr)
      tx = make_optimizer(optim, steps, vocab)
      graphdef, init = init_state_fn(config, tx)
      step_fn = jax.jit(make_train_step(graphdef, config, tx, valid_vocab=vocab,
                                        fused_loss=t.fused_loss), donate_argnums=(0,))
      eval_fn = jax.jit(make_eval_step(graphdef, valid_vocab=vocab,
                                       fused_loss=t.fused_loss))
      init_fn = jax.jit(init)
      for s in range(seeds):
        start = time.perf_counter()
        curves, evals, first = _run_one(step_fn, eval_fn, init_fn,
                                        jax.random.key(t.seed + s), batches[s], eval_data,
                                        eval_every, lr_schedule(optim, steps))
        took = time.perf_counter() - start
        steady = (took - first[0]) / max(steps - 1, 1)
        runs.append(dict(optimizer=name, lr=float(lr), seed=s, curves=curves,
                         evals=evals, final_val_loss=evals[-1][1],
                         final_train_loss=_tail_mean(curves["loss"]),
                         first_step_s=first[0], step_s=steady, wall_s=took))
        log(f"{name:>6} lr={lr:<9.3g} seed={s}: val {evals[-1][1]:.4f}  train "
            f"{runs[-1]['final_train_loss']:.4f}  ({took:.1f} s)")

  report = dict(
      command="optimizers", config=json.loads(run.to_json_best_effort()),
      model=config.to_dict(), vocab=vocab, steps=steps, seeds=seeds, lrs=list(lrs),
      optimizers=list(optimizers), eval_tokens=int(sum(b.size for b in eval_data)) or None,
      device=f"{jax.default_backend()}: {device.device_kind}", jax=jax.__version__,
      runs=runs)
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


# ---------------------------------------------------------------------------------------
# plots


def _smooth(y, window: int):
  y = np.asarray(y, float)
  if window <= 1 or len(y) < window:
    return y
  c = np.cumsum(np.insert(y, 0, 0.0))
  head = c[1:window] / np.arange(1, window)
  return np.concatenate([head, (c[window:] - c[:-window]) / window])


def _curve_stats(runs, key, window):
  ys = np.stack([_smooth(r["curves"][key], window) for r in runs])
  return ys.mean(0), ys.min(0), ys.max(0)


def plot_report(report: dict, out_dir: str) -> list[str]:
  """Four PNGs: loss curves (seed bands), val loss vs LR, adaptive scales, grad norm."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  runs, summary = report["runs"], report["summary"]
  colors = {"velvet": "tab:purple", "adamw": "tab:green"}
  styles = ["-", "--", ":", "-."]
  lrs = sorted({r["lr"] for r in runs})
  window = max(1, report["steps"] // 20)
  paths = []

  def group(name, lr):
    return [r for r in runs if r["optimizer"] == name and r["lr"] == lr]

  def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

  # 1. training loss (smoothed, min-max band over seeds) + validation points
  fig, (ax, axv) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in report["optimizers"]:
    for i, lr in enumerate(lrs):
      rs = group(name, lr)
      if not rs:
        continue
      mean, lo, hi = _curve_stats(rs, "loss", window)
      x = np.arange(1, len(mean) + 1)
      label = f"{name} lr={lr:g}"
      ax.plot(x, mean, styles[i % 4], color=colors.get(name), label=label, lw=1.3)
      ax.fill_between(x, lo, hi, color=colors.get(name), alpha=0.12)
      ev = np.array([[s for s, _ in r["evals"]] for r in rs])[0]
      vals = np.array([[v for _, v in r["evals"]] for r in rs])
      axv.errorbar(ev, vals.mean(0), yerr=vals.std(0), fmt=styles[i % 4] + "o",
                   color=colors.get(name), label=label, ms=3, capsize=2)
  ax.set(title=f"training loss (moving avg {window}, band = seed min-max)", xlabel="step",
         ylabel="loss")
  axv.set(title="validation loss (mean ± std over seeds)", xlabel="step", ylabel="loss")
  for a in (ax, axv):
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  save(fig, "loss_curves.png")

  # 2. final validation loss vs LR
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name in report["optimizers"]:
    rows = [r for r in summary["table"] if r["optimizer"] == name]
    ax.errorbar([r["lr"] for r in rows], [r["val_mean"] for r in rows],
                yerr=[r["val_std"] for r in rows], fmt="o-", color=colors.get(name),
                label=name, capsize=3)
  ax.set_xscale("log")
  ax.set(title=f"final validation loss vs peak LR ({report['steps']} steps, "
         f"{report['seeds']} seeds)", xlabel="peak learning rate", ylabel="val loss")
  ax.legend()
  ax.grid(alpha=0.3, which="both")
  save(fig, "val_loss_vs_lr.png")

  # 3. Velvet's adaptive signals over time, at each LR
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for i, lr in enumerate(lrs):
    rs = group("velvet", lr)
    if not rs or "entropy_scale" not in rs[0]["curves"]:
      continue
    for a, key in zip(axes, ("entropy_scale", "perplexity_scale", "learning_rate")):
      mean, lo, hi = _curve_stats(rs, key, 1)
      x = np.arange(1, len(mean) + 1)
      a.plot(x, mean, styles[i % 4], color=colors["velvet"], label=f"velvet lr={lr:g}")
      a.fill_between(x, lo, hi, color=colors["velvet"], alpha=0.12)
  for lr in lrs[:1]:
    rs = group("adamw", lr)
    if rs:
      axes[2].plot(rs[0]["curves"]["learning_rate"], color=colors["adamw"],
                   label=f"adamw schedule lr={lr:g}", lw=1)
  for a, title in zip(axes, ("entropy scale (LR multiplier)",
                             "perplexity scale (beta1 multiplier)", "effective LR")):
    a.set(title=title, xlabel="step")
    if a.get_legend_handles_labels()[0]:  # empty without Velvet runs
      a.legend(fontsize=7)
    a.grid(alpha=0.3)
  save(fig, "adaptive_scales.png")

  # 4. gradient norm (pre-clip)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in report["optimizers"]:
    for i, lr in enumerate(lrs):
      rs = group(name, lr)
      if rs and "grad_norm" in rs[0]["curves"]:
        mean, lo, hi = _curve_stats(rs, "grad_norm", window)
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, styles[i % 4], color=colors.get(name), label=f"{name} lr={lr:g}")
        ax.fill_between(x, lo, hi, color=colors.get(name), alpha=0.12)
  ax.set_yscale("log")
  ax.set(title=f"global gradient norm before clipping (moving avg {window})",
         xlabel="step")
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  save(fig, "grad_norm.png")
  return paths


# ---------------------------------------------------------------------------------------
# throughput


def _model_vocab(run) -> int:
  """The model's vocabulary without reading data: the config's, or the tokenizer spec's."""
  from vesperjax.data import padded_vocab_size
  from vesperjax.data.tokenizer import Tokenizer, byte_tokenizer, parse_spec
  if run.model.vocab_size is not None:
    return run.model.vocab_size
  kind, n = parse_spec(run.data.tokenizer)
  if kind == "bpe":
    return padded_vocab_size(n)
  tok = byte_tokenizer() if kind == "byte" else Tokenizer.from_file(run.data.tokenizer)
  return padded_vocab_size(tok.vocab_size)


def peak_memory() -> tuple[int | None, str]:
  """(bytes, source): the device allocator's peak, else this process's max RSS."""
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001  (backends without allocator stats)
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 if platform.system() == "Darwin" else 1024  # Linux reports KiB
  return int(rss * scale), "process_max_rss (host memory: no device allocator stats)"


def matmul_gflops(seconds: float = 0.3) -> float:
  """The median rate of a fixed fp32 [2048,256] @ [256,1024] matmul on device 0, now.

  A yardstick printed beside step times: a shared VM's cores do not run at one speed (on
  the 2-vCPU dev VM this matmul runs at ~90 or ~150 GFLOP/s depending on the host's
  placement), so step times from different runs compare only at similar yardsticks.
  """
  import jax
  import jax.numpy as jnp
  a, b = jnp.ones((2048, 256), jnp.float32), jnp.ones((256, 1024), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  rates, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end or len(rates) < 3:
    start = time.perf_counter()
    f(a, b).block_until_ready()
    rates.append(2 * 2048 * 256 * 1024 / (time.perf_counter() - start) / 1e9)
  return float(np.median(rates))


def run_throughput(run, *, batch_size: int | None = None, seq_len: int | None = None,
                   steps: int = 10, warmup: int = 2) -> dict:
  """Time the trainer's train step on synthetic tokens; a JSON-able result."""
  import jax

  from vesperjax import sharding
  from vesperjax.run_config import model_config
  from vesperjax.trainer import device_peak_flops
  from vesperjax.train_step import flops_per_token, sharded_steps

  t = run.train
  batch_size = batch_size or t.batch_size
  seq_len = seq_len or run.data.seq_len
  if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 2:
    raise ValueError("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --seq-len >= 2")
  config = model_config(run, _model_vocab(run))
  if seq_len > config.max_seq_len:
    raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len "
                     f"{config.max_seq_len}")
  mesh = sharding.make_mesh(**run.mesh)
  if batch_size % sharding.batch_divisor(mesh):
    raise ValueError(f"batch size {batch_size} must be a multiple of the "
                     f"{sharding.batch_divisor(mesh)} batch shards of the mesh")
  compiled = sharded_steps(config, run, mesh, valid_vocab=config.vocab_size)
  step_fn, batch_sharding = compiled.train_step, compiled.batch_sharding
  state = compiled.init(jax.random.key(t.seed))
  rng = np.random.default_rng(t.seed)
  host = rng.integers(0, config.vocab_size, (t.grad_accum, batch_size, seq_len + 1),
                      dtype=np.int32)
  batch = sharding.global_batch_from_host(host, mesh, batch_sharding)

  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(state)
  yardstick = [matmul_gflops()]
  times = []
  cpu_start = _cpu_seconds()
  for _ in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - start)
  cpu_per_step = (_cpu_seconds() - cpu_start) / steps
  yardstick.append(matmul_gflops())
  loss = float(m["loss"])

  tokens = t.grad_accum * batch_size * seq_len
  median = float(np.median(times))
  tps = tokens / median
  peak = device_peak_flops()
  fpt = flops_per_token(config, seq_len)
  mem, mem_source = peak_memory()
  dev = jax.devices()[0]
  return dict(
      command="throughput", preset=run.model.preset, params=_count(state.params),
      vocab=config.vocab_size, batch_size=batch_size, seq_len=seq_len,
      grad_accum=t.grad_accum, tokens_per_step=tokens, dtype=np.dtype(config.compute_dtype()).name,
      optimizer=run.optim.name, fused_optimizer=bool(run.optim.fused),
      fused_loss=bool(t.fused_loss), remat=config.remat, scan_layers=config.scan_layers,
      mesh=dict(mesh.shape),
      steps=steps, warmup=warmup, compile_s=round(compile_s, 3),
      step_s_median=median, step_s_min=float(min(times)), step_s_max=float(max(times)),
      tokens_per_s=tps, flops_per_token=fpt, achieved_flops=tps * fpt,
      mfu=(tps * fpt / (peak * jax.device_count())) if peak else None,
      peak_mem_bytes=mem, peak_mem_source=mem_source, final_loss=loss,
      matmul_gflops_before_after=[round(x, 1) for x in yardstick],
      backend=jax.default_backend(), device_kind=dev.device_kind,
      devices=jax.device_count(), jax=jax.__version__,
      cpu_threads=os.cpu_count() if jax.default_backend() == "cpu" else None,
      # CPU seconds (all threads) per step: on a shared CPU, wall time mostly measures
      # the other jobs; this does not (much). cpu_s / threads ~ the wall time when idle.
      process_cpu_s_per_step=cpu_per_step)


def _cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _count(tree) -> int:
  import jax
  return int(sum(x.size for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------
# CLI


def _config_name() -> str:
  path = config_flags.get_config_filename(FLAGS["config"])
  return os.path.splitext(os.path.basename(path))[0]


def _floats(values, flag: str) -> list[float]:
  out = []
  for v in values:
    try:
      x = float(v)
    except ValueError:
      raise ValueError(f"--{flag}: {v!r} is not a number") from None
    if not (x > 0 and math.isfinite(x)):
      raise ValueError(f"--{flag}: {v!r} must be a positive number")
    out.append(x)
  if not out:
    raise ValueError(f"--{flag}: give at least one value")
  return out


def _command(name: str) -> int:
  if name == "plot":
    path = _REPORT.value
    if not path or not os.path.isfile(path):
      raise ValueError(f"plot needs --report REPORT.json (got {path!r})")
    with open(path) as f:
      try:
        report = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None
    for p in plot_report(report, os.path.join(os.path.dirname(path) or ".", "plots")):
      print(p)
    return 0

  run = load_run_config(_CONFIG)
  if name == "throughput":
    result = run_throughput(run, batch_size=_BATCH.value, seq_len=_SEQ.value,
                            steps=_STEPS.value or 10, warmup=_WARMUP.value)
    print(json.dumps(result))
    return 0

  lrs = _floats(_LRS.value, "lrs") if _LRS.value else [
      run.optim.lr * f for f in (0.5, 1.0, 2.0)]
  opts = [o.strip().lower() for o in _OPTIMIZERS.value]
  bad = [o for o in opts if o not in OPTIMIZERS]
  if bad or not opts:
    raise ValueError(f"--optimizers: {bad or 'none given'}; choose from velvet, adamw")
  if _SEEDS.value < 1:
    raise ValueError(f"--seeds {_SEEDS.value}: must be >= 1")
  steps = _STEPS.value or run.train.max_steps
  if steps < 1:
    raise ValueError(f"--steps {steps}: must be >= 1")
  workdir = _WORKDIR.value or os.path.join("runs", f"benchmark-{_config_name()}")
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  report = run_optimizers(run, workdir, seeds=_SEEDS.value, lrs=lrs, steps=steps,
                          optimizers=opts, log=log)
  print(format_table(report["summary"]))
  paths = plot_report(report, os.path.join(workdir, "plots"))
  print(f"report: {os.path.join(workdir, 'benchmark_report.json')}")
  print("plots: " + ", ".join(paths))
  return 0


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    got = repr(argv[1]) if len(argv) > 1 else "nothing"
    print(f"error: expected a command ({', '.join(COMMANDS)}), got {got}; e.g. "
          "python -m vesperjax.benchmark throughput --config experiments/tiny.py",
          file=sys.stderr)
    return 2
  name = argv.pop(1)
  return run_cli(argv, lambda: _command(name), flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
