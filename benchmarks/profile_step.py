"""Where a CPU train step's time goes, by XLA op kind: a per-op profile of the real step.

  python benchmarks/profile_step.py --config experiments/tiny_moe.py [--steps 3]
      [--top 25] [--out DIR] [--hlo FILE] [--json FILE] [--config.model.vocab_size=8192 ...]

Builds the train step as `python -m vesperjax.benchmark throughput` does (batch 8 x seq
256 unless --batch-size / --seq-len), runs it under `jax.profiler` with XLA:CPU's per-op
trace events (`--xla_cpu_enable_xprof_traceme`), and prints the time per op kind
(`ynn_fusion`: YNNPACK dots and what is fused into them, `dot_general`: Eigen dots,
`gather_*_fusion`, ...) per step, summed over the ops of that kind. XLA:CPU runs
independent ops at once, so the sum can exceed the step's wall time. `--hlo FILE` writes
the compiled HLO, to look up an op by the name the table shows. docs/performance.md
reads these tables.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# trace events that wrap ops (executors, thread pools, Python) rather than being one
_WRAPPERS = ("ThunkExecutor", "SlinkyThreadPool", "$", "XlaModule", "PjRt", "Execute")


def op_times(trace_events: list[dict], steps: int) -> tuple[dict, dict]:
  """({op kind: ms per step}, {op kind: ops per step}) of a perfetto trace's events: an
  op's kind is its name without the trailing `.N`."""
  ms, count = collections.defaultdict(float), collections.Counter()
  for e in trace_events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name.startswith(_WRAPPERS) or " " in name:
      continue
    kind = re.sub(r"\.\d+$", "", name)
    ms[kind] += e.get("dur", 0) / 1000 / steps
    count[kind] += 1
  return dict(ms), {k: v / steps for k, v in count.items()}


def format_table(ms: dict, count: dict, wall_s: float, top: int) -> str:
  lines = [f"step wall time {wall_s * 1000:.0f} ms; op time summed {sum(ms.values()):.0f} ms",
           f"{'ms/step':>9} {'ops/step':>9}  op kind"]
  for kind, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f"{t:9.1f} {count[kind]:9.0f}  {kind}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=None, help="trace folder (default: a temp dir)")
  parser.add_argument("--hlo", default=None, help="also write the compiled HLO here")
  parser.add_argument("--json", default=None, help="also write the table as JSON here")
  args, overrides = parser.parse_known_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")  # before jax starts
                             + " --xla_cpu_enable_xprof_traceme=true").strip()
  import jax
  import numpy as np
  from ml_collections import config_flags
  from absl import flags

  from vesperjax import sharding
  from vesperjax.training import build
  from vesperjax.run_config import RunConfig

  fv = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file("config", None, flag_values=fv)
  fv(["profile_step", f"--config={args.config}", *overrides])
  cd = config_flag.value
  cd.train.batch_size, cd.data.seq_len = args.batch_size, args.seq_len
  run = RunConfig.from_config_dict(cd)
  mesh = build.checked_mesh(run, args.batch_size)
  model = build.build_model(run, mesh, vocab_size=build.model_vocab(run))
  steps, vocab = model.steps, model.config.vocab_size
  rng = np.random.default_rng(0)
  out = args.out or tempfile.mkdtemp(prefix="vesperjax-profile-")
  with jax.set_mesh(mesh):
    state = steps.init(jax.random.key(0))
    batch = sharding.global_batch_from_host(
        rng.integers(0, vocab, (1, args.batch_size, args.seq_len + 1), dtype=np.int32),
        mesh, steps.batch_sharding)
    for _ in range(3):  # compile and warm up
      state, metrics = steps.train_step(state, batch)
      jax.block_until_ready(metrics)
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    cpu_start, start = time.process_time(), time.perf_counter()
    for _ in range(args.steps):
      state, metrics = steps.train_step(state, batch)
      jax.block_until_ready(metrics)
    wall = (time.perf_counter() - start) / args.steps
    cpu = (time.process_time() - cpu_start) / args.steps
    jax.profiler.stop_trace()
    if args.hlo:
      with open(args.hlo, "w") as f:
        f.write(steps.train_step.lower(state, batch).compile().as_text())
  path = sorted(glob.glob(os.path.join(out, "plugins", "profile", "*",
                                       "perfetto_trace.json.gz")))[-1]
  trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  print(f"python benchmarks/profile_step.py {' '.join(sys.argv[1:] if argv is None else argv)}")
  ms, count = op_times(events, args.steps)
  print(format_table(ms, count, wall, args.top))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(wall_s=wall, cpu_s_per_step=cpu, ms=ms, count=count), f)
  print(f"trace: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
