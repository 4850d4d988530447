"""What JAX's persistent compilation cache (turned on by the CLI: `cli.use_compilation_cache`)
saves when a training job starts again: the wall time of `python -m vesperjax.train`
with an empty cache (first start) against the same command once the first start filled
it (second start: a restarted or requeued job), in rounds (cold, warm, cold, warm, ...)
so that the machine's drift hits both alike. Each start trains a fresh workdir for
--steps steps; the data cache is built once beforehand and shared, so tokenizing is in
neither time. Each round's cold start gets its own empty cache folder, given to the CLI
as XDG_CACHE_HOME (the CLI's own default place, JAX_COMPILATION_CACHE_DIR unset).
Writes a JSON report (command, commit, date, machine) and prints it.

  nice python benchmarks/compile_cache_bench.py --rounds 3 \\
      --json benchmarks/compile-cache/DATE.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling vs_original

from vs_original import machine_info, print_report  # noqa: E402


def commit() -> str | None:
  p = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                     capture_output=True, text=True)
  return p.stdout.strip() or None


def train_command(workdir: str, data: str, steps: int, preset: str) -> list[str]:
  return [sys.executable, "-m", "vesperjax.train", f"--config=experiments/{preset}.py",
          f"--workdir={workdir}", "--config.data.tokenizer=byte",
          f"--config.data.dataset={data}/corpus.txt",
          "--config.data.seq_len=64", f"--config.data.cache_dir={data}/cache",
          "--config.train.batch_size=8", f"--config.train.max_steps={steps}",
          f"--config.train.eval_every={steps}", "--config.train.eval_batches=1",
          f"--config.train.save_every={steps}", "--config.train.sample_tokens=0",
          "--config.optim.warmup_steps=1"]


def start(cmd: list[str], cache_home: str) -> float:
  """Wall seconds of one training start with XDG_CACHE_HOME=cache_home."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=cache_home)
  t = time.perf_counter()
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  took = time.perf_counter() - t
  if r.returncode:
    raise SystemExit(f"error: the training start failed ({r.returncode}): "
                     f"{r.stderr.strip().splitlines()[-1:]}")
  return took


def folder_bytes(path: str) -> tuple[int, int]:
  files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
  return len(files), sum(os.path.getsize(f) for f in files)


def run(args, argv: list[str]) -> dict:
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", os.path.relpath(os.path.abspath(__file__), os.getcwd()),
                          *argv]),
      commit=commit(), machine=dict(machine_info(), nice=os.nice(0)),
      setting=dict(preset=args.preset, steps=args.steps, seq_len=64, batch=8,
                   tokenizer="byte", platform="cpu",
                   dataset="the sources of email, json.decoder and argparse (~150 KB)",
                   min_compile_time_secs=0.5),
      rounds=[])
  with tempfile.TemporaryDirectory() as tmp:
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    with open(os.path.join(data, "corpus.txt"), "w") as f:  # ~150 KB of real text
      import email
      f.write("\n\n".join(open(m.__file__).read() for m in (email, json.decoder, argparse)))
    start(train_command(os.path.join(tmp, "warmup"), data, 1, args.preset),
          os.path.join(tmp, "warmup-cache"))  # builds the shared data cache
    for i in range(args.rounds):
      cache = os.path.join(tmp, f"cache-{i}")
      cold = start(train_command(os.path.join(tmp, f"cold-{i}"), data, args.steps,
                                 args.preset), cache)
      files, size = folder_bytes(cache)
      warm = start(train_command(os.path.join(tmp, f"warm-{i}"), data, args.steps,
                                 args.preset), cache)
      report["rounds"].append(dict(first_start_s=round(cold, 2), second_start_s=round(warm, 2),
                                   cache_files=files, cache_mb=round(size / 2**20, 2)))
      print(f"round {i}: first start {cold:.1f} s, second {warm:.1f} s", file=sys.stderr)
  firsts = [r["first_start_s"] for r in report["rounds"]]
  seconds = [r["second_start_s"] for r in report["rounds"]]
  report["median"] = dict(first_start_s=statistics.median(firsts),
                          second_start_s=statistics.median(seconds),
                          saved_s=round(statistics.median(firsts) - statistics.median(seconds), 2),
                          saved_fraction=round(1 - statistics.median(seconds)
                                               / statistics.median(firsts), 3))
  report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return report


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--preset", default="tiny", help="experiments/<preset>.py")
  p.add_argument("--json", default=None, help="write the report here too")
  args = p.parse_args(argv)
  if args.rounds < 1 or args.steps < 1:
    print("error: --rounds and --steps must be >= 1", file=sys.stderr)
    return 2
  if not os.path.exists(os.path.join(ROOT, "experiments", f"{args.preset}.py")):
    print(f"error: --preset {args.preset}: no experiments/{args.preset}.py", file=sys.stderr)
    return 2
  print_report(run(args, argv), args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
