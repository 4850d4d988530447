"""`python -m vesperjax.benchmark {optimizers,throughput,plot} --config FILE [...]`.

optimizers: Velvet vs AdamW (and the ablation arms) on the same data, model init and
  batches, each over a learning-rate sweep, several seeds, judged by held-out validation
  loss (`bench.optimizers`). Writes WORKDIR/benchmark_report.json after every run (or
  grows a gzipped benchmark_report.json.gz in place; a rerun keeps the finished runs) and WORKDIR/plots/*.png (`bench.plots`), prints a table.
throughput: times the trainer's jit train step (after compiling it) on synthetic
  tokens of the model's vocabulary (no data, no tokenizer) on the run's mesh; prints
  one JSON line (`bench.throughput`).
plot: redraws the plots of a report: `plot --report WORKDIR/benchmark_report.json` (or
  a gzipped `.json.gz`).
table: prints a report's one-row-per-arm markdown table: `table --report REPORT`
  (`--seed 0`: every arm at every LR of that seed instead).

`--config.key=value` overrides apply as in `vesperjax.train`. Bad input ends with one
`error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import math
import os
import sys

from absl import flags
from ml_collections import config_flags

from vesperjax.bench.optimizers import (ARMS, OPTIMIZERS, read_report, report_path,
                                         run_optimizers, summarize)
from vesperjax.bench.tables import first_seed_grid, format_table, markdown_table
from vesperjax.bench.plots import plot_report
from vesperjax.bench.throughput import run_throughput
from vesperjax.cli import asked_for, load_run_config, run_cli, warn

COMMANDS = ("optimizers", "throughput", "plot", "table")

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
_OPTIMIZERS = flags.DEFINE_list(
    "optimizers", list(OPTIMIZERS), "optimizers: the arms to compare (vesperjax/bench/"
    "optimizers.py ARMS): velvet, adamw, adamw-clipped-b1 (AdamW with the beta1 Velvet "
    "uses while perplexity > 57), velvet-entropy / velvet-perplexity (one rule only), "
    "velvet-rules-off, the original rules with one change (velvet-product-bc, "
    "velvet-smoothed, velvet-horizon, velvet-trend, velvet-b1max-0.9|0.95|0.98), "
    "velvet-corrected, muon, schedule-free-adamw, ademamix, adamw-entropy-lr, "
    "muon-entropy-lr.", flag_values=FLAGS)
_TOP_LRS = flags.DEFINE_integer(
    "top-lrs", 0, "optimizers: run every LR at the first seed, the other seeds only at "
    "each arm's best K LRs of it (0: every seed at every LR).", flag_values=FLAGS)
_BRACKET = flags.DEFINE_integer(
    "bracket", 0, "optimizers: grow an arm's LR grid by its own ratio, at most N times, "
    "while the first seed's best LR sits at the grid's edge (needs >= 2 LRs).",
    flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "optimizers: training steps per run "
                              "(default config.train.max_steps); throughput: timed steps "
                              "(default 10).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch-size", None, "throughput: global batch (default "
                              "config.train.batch_size).", flag_values=FLAGS)
_SEQ = flags.DEFINE_integer("seq-len", None, "throughput: sequence length (default "
                            "config.data.seq_len).", flag_values=FLAGS)
_WARMUP = flags.DEFINE_integer("warmup", 2, "throughput: untimed steps after compiling.",
                               flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", None, "table: every arm's validation loss at each LR "
                              "for this seed (the sweep's grid) instead of the best-LR "
                              "rows.", flag_values=FLAGS)
_REPORT = flags.DEFINE_string("report", None, "plot, table: a benchmark_report.json.",
                              flag_values=FLAGS)


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
  if name in ("plot", "table"):
    path = _REPORT.value
    if not path or not os.path.isfile(path):
      raise ValueError(f"{name} needs --report REPORT.json (got {path!r})")
    report = read_report(path)  # large sweeps are kept gzipped
    report["summary"] = summarize(report)  # as this version reads the runs
    if name == "table":
      print(markdown_table(report["summary"]) if _SEED.value is None
            else first_seed_grid(report, _SEED.value))
      return 0
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
  bad = [o for o in opts if o not in ARMS]
  if bad or not opts or len(set(opts)) < len(opts):
    raise ValueError(f"--optimizers: {bad or opts or 'none given'}; choose distinct arms "
                     f"from {', '.join(ARMS)}")
  if _TOP_LRS.value < 0 or _BRACKET.value < 0:
    raise ValueError("--top-lrs and --bracket must be >= 0")
  if _BRACKET.value and len(lrs) < 2:
    raise ValueError("--bracket needs at least two --lrs (their ratio is the step)")
  if _SEEDS.value < 1:
    raise ValueError(f"--seeds {_SEEDS.value}: must be >= 1")
  steps = _STEPS.value or run.train.max_steps
  if steps < 1:
    raise ValueError(f"--steps {steps}: must be >= 1")
  from vesperjax.optim.field import adjusted_values
  for line in adjusted_values(run.optim, steps):  # every run of the sweep has `steps`
    warn(line)
  workdir = _WORKDIR.value or os.path.join("runs", f"benchmark-{_config_name()}")
  log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
  report = run_optimizers(run, workdir, seeds=_SEEDS.value, lrs=lrs, steps=steps,
                          optimizers=opts, log=log, top_lrs=_TOP_LRS.value,
                          bracket=_BRACKET.value)
  print(format_table(report["summary"]))
  paths = plot_report(report, os.path.join(workdir, "plots"))
  print(f"report: {report_path(workdir)}")
  print("plots: " + ", ".join(paths))
  return 0


def main(argv=None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  argv = list(sys.argv if argv is None else argv)
  if len(argv) > 1 and argv[1] not in COMMANDS and asked_for(argv[:2]):
    return run_cli(argv[:2], lambda: 0, flag_values=FLAGS)  # --help / --version
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
