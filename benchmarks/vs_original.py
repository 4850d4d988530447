"""vesperjax's CPU train step against the original PyTorch trainer's, side by side.

  python benchmarks/vs_original.py --original PATH [--rounds 4] [--steps 12]
      [--models dense,moe] [--warmup 2] [--torch-compile] [--json OUT]

PATH: a local checkout of the original (public repository
thevesperhouse-hub/VelvetOptimizer), or its `python/` folder; its trainer and `vesper`
package are imported from there at run time, never copied here. Needs torch in this
Python (`pip install torch`, the CPU wheel, or `pip install -e .[compare]`); vesperjax
never depends on it.

Same shapes on both sides (issue #17): vocab 8192, batch 8 x seq 256, fp32, Velvet; dense
= `tiny`, moe = `tiny-moe` (4 experts, top-2). One step = forward, cross-entropy (+0.01 x
the MoE aux loss), backward, clipping, optimizer step: the original's training-loop body
at grad_accum 1, eager unless --torch-compile; ours `python -m vesperjax.benchmark
throughput` on experiments/tiny.py (tiny_moe.py), timed after compiling. Each side runs in
its own process per round, the order alternating; warm-up steps are not timed. Both
models are built and compared first: differing shapes, or parameter counts that differ by
other than what the original trains and we do not, refuse the run.

Prints the shapes, each round's median (min) per side and ratio (original's step time /
ours: above 1 means vesperjax is faster), each side's matmul yardstick (a fixed fp32
[2048,256] @ [256,1024] matmul, in torch and in JAX, before/after its timed steps), the
summary, date, machine and command; --json OUT keeps the whole report. Bad input: one
`error:` line, exit 2; a side that fails: one `error:` line, exit 1. docs/benchmarks.md,
"Against the original, side by side", says more.
"""
from __future__ import annotations

import argparse, datetime, json, os, platform, shlex, statistics, subprocess, sys  # noqa: E401
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling vs_original_sides
from vs_original_sides import BATCH, ROOT, SEQ, VOCAB  # noqa: E402

SIDES = ("original", "vesperjax")
# model: (our experiment config, the original's MoE (experts, top-k) or None)
MODELS = {"dense": ("experiments/tiny.py", None), "moe": ("experiments/tiny_moe.py", (4, 2))}
# Compared between the two sides; any difference refuses the run.
SHAPE_FIELDS = ("vocab", "hidden", "layers", "heads", "ffn", "lora_rank", "lora_alpha",
                "lora_sparsity", "era_gamma", "experts", "top_k", "aux_weight", "norm_eps",
                "rope_theta", "dtype", "optimizer", "max_grad_norm")
WORKER_TIMEOUT_S = 3600


class Refused(Exception):
  """Bad input or mismatched models: one `error:` line, exit 2."""


class SideFailed(Exception):
  """A side's process failed: one `error:` line, exit 1."""


# --- the report: pure functions of result dicts (tested without torch) ----------------

def expected_param_difference(shape: dict) -> int:
  """Original's trainable parameters minus ours for the same shapes.

  The original's FlyLoRA is plain LoRA: each gate/up projection trains a down-projection
  [hidden, rank] + bias and an up-projection bias; ours keeps A frozen (not a parameter)
  and its B has no bias. Its MoE router has a bias, ours none.
  """
  per_linear = shape["hidden"] * shape["lora_rank"] + shape["lora_rank"] + shape["ffn"]
  ffns = max(shape["experts"], 1)
  return shape["layers"] * (ffns * 2 * per_linear + shape["experts"])


def check_shapes(original: dict, ours: dict) -> int:
  """Raise Refused unless the two models match; return the parameter difference."""
  diff = [f"{k}: original {original.get(k)!r}, vesperjax {ours.get(k)!r}"
          for k in SHAPE_FIELDS if original.get(k) != ours.get(k)]
  if diff:
    raise Refused("the two models differ (" + "; ".join(diff) + ")")
  got, want = original["params"] - ours["params"], expected_param_difference(ours)
  if got != want:
    raise Refused(f"parameter counts differ by {got:,}, not the {want:,} the original's "
                  f"trainable LoRA down-projections and biases account for")
  return got


def summarize(rounds: list[dict]) -> dict:
  """Per model: medians over the rounds' medians, fastest steps, the ratios."""
  out = {}
  for model in dict.fromkeys(r["model"] for r in rounds):
    rs = [r for r in rounds if r["model"] == model]
    med = {s: statistics.median(r[s]["median_s"] for r in rs) for s in SIDES}
    best = {s: min(r[s]["min_s"] for r in rs) for s in SIDES}
    out[model] = dict(
        rounds=len(rs), original_median_s=med["original"],
        vesperjax_median_s=med["vesperjax"], ratio=med["original"] / med["vesperjax"],
        round_ratios=[r["original"]["median_s"] / r["vesperjax"]["median_s"] for r in rs],
        original_min_s=best["original"], vesperjax_min_s=best["vesperjax"],
        ratio_of_mins=best["original"] / best["vesperjax"])
  return out


def _gflops(pair) -> str:
  return "/".join(f"{x:.0f}" for x in pair) if pair else "-"


def format_shapes(shapes: dict) -> str:
  cols = ("vocab", "hidden", "layers", "heads", "ffn", "lora_rank", "experts", "top_k",
          "params")
  lines = ["model  side       " + " ".join(f"{c:>9}" for c in cols)]
  for model, s in shapes.items():
    for side in SIDES:
      lines.append(f"{model:<6} {side:<10} " + " ".join(
          f"{s[side][c]:>9,}" if c == "params" else f"{s[side][c]:>9}" for c in cols))
    lines.append(f"       params: the original trains {s['param_difference']:,} more "
                 "(its LoRA down-projections and biases; ours: a frozen sparse A)")
  return "\n".join(lines)


def format_rounds(rounds: list[dict]) -> str:
  lines = ["round  model  first      original median (min)  vesperjax median (min)  "
           "ratio  yardstick torch | jax GFLOP/s (before/after)"]
  for r in rounds:
    o, v = r["original"], r["vesperjax"]
    lines.append(
        f"{r['round']:>5}  {r['model']:<6} {r['order'][0]:<10} "
        f"{o['median_s']:>8.3f} s ({o['min_s']:.3f})     "
        f"{v['median_s']:>8.3f} s ({v['min_s']:.3f})     "
        f"{o['median_s'] / v['median_s']:>5.2f}x  "
        f"{_gflops(o.get('yardstick_gflops'))} | {_gflops(v.get('yardstick_gflops'))}")
  return "\n".join(lines)


def format_summary(summary: dict) -> str:
  lines = []
  for model, s in summary.items():
    lines.append(
        f"{model}: vesperjax at {s['ratio']:.2f}x the original over {s['rounds']} "
        f"round(s) (median of the rounds' medians: original {s['original_median_s']:.3f} s, "
        f"vesperjax {s['vesperjax_median_s']:.3f} s; per round "
        + " ".join(f"{x:.2f}" for x in s["round_ratios"])
        + f"; fastest steps {s['original_min_s']:.3f} s vs {s['vesperjax_min_s']:.3f} s, "
        f"{s['ratio_of_mins']:.2f}x)")
  lines.append("ratio = original's step time / vesperjax's: above 1 means vesperjax is "
               "faster.")
  return "\n".join(lines)


def report_head(report: dict) -> list[str]:
  """The date, machine, command and versions lines every side-by-side report opens with."""
  m, v = report["machine"], report["versions"]
  return [
      f"date: {report['date']}",
      f"machine: {m['cpu_model']}, {m['cpu_count']} logical CPUs ({m['affinity']} usable),"
      f" {m['platform']}; load average {m['loadavg_start']} at start, "
      f"{m['loadavg_end']} at end",
      f"command: {report['command']}",
      f"versions: torch {v['torch']} ({v['torch_threads']} threads), jax {v['jax']}, "
      f"vesperjax {v['vesperjax_git'] or '(not a git checkout)'}, original "
      f"{v['original_git'] or '(not a git checkout)'} at {v['original_path']}"]


def format_report(report: dict) -> str:
  st = report["setting"]
  head = report_head(report) + [
      f"setting: vocab {st['vocab']}, batch {st['batch']} x seq {st['seq_len']}, "
      f"{st['dtype']}, {st['optimizer']}; {st['steps']} timed steps after {st['warmup']} "
      f"warm-up (ours after compiling); original "
      f"{'torch.compile' if st['torch_compile'] else 'eager'}; each side in its own "
      "process, order alternating by round",
      "yardstick: fp32 [2048,256] @ [256,1024] matmul, measured in torch (original's "
      "process) and JAX (ours), before/after the timed steps",
  ]
  return "\n\n".join(["\n".join(head), format_shapes(report["shapes"]),
                      format_rounds(report["rounds"]), format_summary(report["summary"])])


# --- arguments --------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise Refused(message)


def original_package(path: str) -> Path:
  """The original's `python/` folder under PATH (or PATH itself); Refused if absent."""
  root = Path(path).expanduser()
  for pkg in (root / "python", root):
    if (pkg / "train.py").is_file() and (pkg / "vesper" / "model.py").is_file():
      return pkg.resolve()
  raise Refused(f"--original {path}: no original trainer there (expected python/train.py "
                "and python/vesper/model.py of a thevesperhouse-hub/VelvetOptimizer "
                "checkout)")


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="vs_original.py", add_help=True)
  p.add_argument("--original", required=True, help="checkout of the original (or its "
                 "python/ folder)")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps", type=int, default=12, help="timed steps per side per round")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
  p.add_argument("--models", default="dense,moe", help="dense, moe or both")
  p.add_argument("--torch-compile", action="store_true", help="torch.compile the "
                 "original's model, as its trainer does without --no-compile")
  p.add_argument("--json", default=None, help="write the whole report here")
  a = p.parse_args(argv)
  if a.rounds < 1 or a.steps < 1 or a.warmup < 0:
    raise Refused(f"need --rounds >= 1, --steps >= 1, --warmup >= 0 (got {a.rounds}, "
                  f"{a.steps}, {a.warmup})")
  return check_common_args(a)


def check_common_args(a: argparse.Namespace) -> argparse.Namespace:
  """--models as a list, --original as its package, --json's folder: Refused if bad."""
  a.models = [m.strip() for m in a.models.split(",") if m.strip()]
  bad = [m for m in a.models if m not in MODELS]
  if bad or not a.models:
    raise Refused(f"--models: {bad or 'none given'}; choose from dense, moe")
  a.package = original_package(a.original)
  if a.json and not Path(a.json).resolve().parent.is_dir():
    raise Refused(f"--json {a.json}: its folder does not exist")
  return a


def run_side(cmd: list[str], what: str) -> subprocess.CompletedProcess:
  """Run a side's process; SideFailed (its last stderr line) unless it exits 0 in time."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=WORKER_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    raise SideFailed(f"{what}: no result within {WORKER_TIMEOUT_S} s") from None
  if proc.returncode != 0:
    _fail(proc, what)
  return proc


def _fail(proc, what: str):
  err = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no output)"]
  raise SideFailed(f"{what} failed (exit {proc.returncode}): {err[-1].strip()}")


def _run_json(cmd: list[str], what: str) -> dict:
  """Run a side's process; its last stdout line is its JSON result."""
  proc = run_side(cmd, what)
  lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
  if not lines:
    _fail(proc, what)
  return json.loads(lines[-1])


def _worker_cmd(name: str, spec: dict) -> list[str]:
  sides = Path(__file__).resolve().parent / "vs_original_sides.py"
  return [sys.executable, str(sides), name, json.dumps(spec)]


def run_original(args, model: str, steps: int) -> dict:
  spec = dict(package=str(args.package), moe=MODELS[model][1], steps=steps,
              warmup=args.warmup, compile=args.torch_compile)
  return _run_json(_worker_cmd("original", spec), f"the original's {model} step")


def run_ours(args, model: str, shape: dict) -> dict:
  """`python -m vesperjax.benchmark throughput` on the same shapes, checked against them."""
  cmd = [sys.executable, "-m", "vesperjax.benchmark", "throughput", "--config",
         str(ROOT / MODELS[model][0]), "--batch-size", str(BATCH), "--seq-len", str(SEQ),
         "--steps", str(args.steps), "--warmup", str(args.warmup),
         f"--config.model.vocab_size={VOCAB}"]
  r = _run_json(cmd, f"vesperjax's {model} step")
  got = dict(params=r.get("params"), vocab=r.get("vocab"), batch=r.get("batch_size"),
             seq_len=r.get("seq_len"), dtype=r.get("dtype"), optimizer=r.get("optimizer"),
             grad_accum=r.get("grad_accum"))
  want = dict(params=shape["params"], vocab=VOCAB, batch=BATCH, seq_len=SEQ,
              dtype=shape["dtype"], optimizer=shape["optimizer"], grad_accum=1)
  if got != want:
    raise Refused(f"vesperjax's {model} run is not the checked model: {got} != {want}")
  return dict(median_s=r["step_s_median"], min_s=r["step_s_min"], max_s=r["step_s_max"],
              yardstick_gflops=r.get("matmul_gflops_before_after"),
              cpu_s_per_step=r.get("process_cpu_s_per_step"), loss=r.get("final_loss"),
              compile_s=r.get("compile_s"), raw=r)


# --- the run ---------------------------------------------------------------------------

def _git(path: Path) -> str | None:
  """`git describe` of the checkout at path (or at its parent), else None."""
  def git(*a):
    p = subprocess.run(["git", "-C", str(path), *a], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None
  top = git("rev-parse", "--show-toplevel")
  if top is None or Path(top).resolve() not in (path.resolve(), path.resolve().parent):
    return None  # not a checkout, or one that merely contains path
  return git("describe", "--always", "--dirty")


def print_report(report: dict, json_path: str | None) -> None:
  """The report on stdout, and in `json_path` too when given (its folder made)."""
  text = json.dumps(report, indent=1)
  print(text)
  if json_path:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
      f.write(text + "\n")


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f
                  if ln.startswith("model name")), cpu)
  except OSError:
    pass
  affinity = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
              else os.cpu_count())
  return dict(cpu_model=cpu, cpu_count=os.cpu_count(), affinity=affinity,
              platform=platform.platform(),
              loadavg_start=[round(x, 2) for x in os.getloadavg()])


def run(args, argv: list[str]) -> dict:
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    raise Refused(f"torch is not installed in {sys.executable}; the original's side needs "
                  "it: pip install torch (the CPU wheel is enough)")
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()),
                          *argv]),
      machine=machine_info(),
      setting=dict(vocab=VOCAB, batch=BATCH, seq_len=SEQ, dtype="float32",
                   optimizer="velvet", steps=args.steps, warmup=args.warmup,
                   torch_compile=args.torch_compile, models=args.models,
                   rounds=args.rounds),
      shapes={}, rounds=[])
  versions = {}
  for model in args.models:
    original = run_original(args, model, steps=0)
    ours = _run_json(_worker_cmd("ours_describe", dict(config=MODELS[model][0])),
                     f"vesperjax's {model} model")["shape"]
    diff = check_shapes(original["shape"], ours)
    report["shapes"][model] = dict(original=original["shape"], vesperjax=ours,
                                   param_difference=diff)
    versions.update(original["versions"])
    print(f"{model}: the shapes match; the original trains {diff:,} more parameters, as "
          "expected", file=sys.stderr, flush=True)

  for i in range(1, args.rounds + 1):
    order = SIDES if i % 2 else SIDES[::-1]
    for model in args.models:
      r = dict(round=i, model=model, order=list(order))
      for side in order:
        r[side] = (run_original(args, model, args.steps)["timing"] if side == "original"
                   else run_ours(args, model, report["shapes"][model]["vesperjax"]))
        print(f"round {i}/{args.rounds} {model} {side}: median {r[side]['median_s']:.3f} s "
              f"(min {r[side]['min_s']:.3f})", file=sys.stderr, flush=True)
      report["rounds"].append(r)
  report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  report["versions"] = dict(
      versions, jax=report["rounds"][0]["vesperjax"]["raw"].get("jax"),
      vesperjax_git=_git(ROOT), original_git=_git(args.package),
      original_path=str(args.package))
  report["summary"] = summarize(report["rounds"])
  return report


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  return report_main(argv, parse_args, run, format_report)


def report_main(argv, parse_args, run, format_report) -> int:
  """A side-by-side command: parse, run, print the report (and its --json); a refused
  setting is one `error:` line and status 2, a failed side status 1."""
  try:
    args = parse_args(argv)
    report = run(args, argv)
  except Refused as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SideFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(format_report(report))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
    print(f"report: {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
