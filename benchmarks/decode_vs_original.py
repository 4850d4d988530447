"""vesperjax's decode against the original's generate loop, side by side on one machine.

  python benchmarks/decode_vs_original.py --original PATH [--rounds 3] [--repeats 3]
      [--tokens 256] [--json OUT]

PATH: a local checkout of the original (thevesperhouse-hub/VelvetOptimizer) or its
`python/` folder; its `generate.py` and `vesper` package are imported from there at run
time, never copied here. Needs torch in this Python (`pip install torch`, the CPU wheel).

Same setting on both sides: the tiny preset, vocab 8192, fp32, random init, batch 1, a
16-token prompt, --tokens new tokens (no end-of-text, so every call makes all of them),
and the original's sampling defaults (temperature 0.8, top-k 50, top-p 0.9, repetition
penalty 1.1). The original side calls its `generate()` as is, which runs the whole
context through the model for every new token (no KV cache); ours is
benchmarks/decode_bench.py: the compiled loop (KV cache, one `lax.while_loop`) and the
streaming path (the same loop handing each token to `on_token`). tokens/s = new tokens /
wall time of one generate call, prompt included, median of --repeats calls after one
warm-up call (ours: the call that compiles). Each side runs in its own process per
round, the order alternating. The models' shapes are compared: a mismatch refuses the
report. Prints each round, the medians over rounds, date, machine and command. Bad
input: one `error:` line, exit 2; a side that fails: one `error:` line, exit 1.
"""
from __future__ import annotations

import argparse, datetime, json, os, shlex, statistics, sys  # noqa: E401
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings
import vs_original as vs  # noqa: E402
from vs_original_sides import ROOT, VOCAB  # noqa: E402

PROMPT_LEN = 16
# The original generate.py's defaults (its argparse), used on both sides.
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
SHAPE_FIELDS = ("vocab", "hidden", "layers", "heads", "ffn", "lora_rank", "experts")
COLUMNS = (("original", "original"), ("loop", "vesperjax loop"),
           ("streaming", "vesperjax streaming"))


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise vs.Refused(message)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = _Parser(prog="decode_vs_original.py")
  p.add_argument("--original", required=True, help="checkout of the original (or its "
                 "python/ folder)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3, help="timed calls per side per round")
  p.add_argument("--tokens", type=int, default=256, help="new tokens per call")
  p.add_argument("--json", default=None, help="write the whole report here")
  a = p.parse_args(argv)
  if a.rounds < 1 or a.repeats < 1 or a.tokens < 1:
    raise vs.Refused(f"need --rounds, --repeats and --tokens >= 1 (got {a.rounds}, "
                     f"{a.repeats}, {a.tokens})")
  a.package = vs.original_package(a.original)
  if not (a.package / "generate.py").is_file():
    raise vs.Refused(f"--original {a.original}: no generate.py beside its train.py")
  if a.json and not Path(a.json).resolve().parent.is_dir():
    raise vs.Refused(f"--json {a.json}: its folder does not exist")
  return a


# --- the original's side, in its own process ------------------------------------------

class _PromptIds:
  """The original generate()'s tokenizer interface over fixed ids: encode gives the
  prompt, no end-of-text token exists, decode returns the ids."""

  def __init__(self, ids):
    self.ids = list(ids)

  def encode(self, _text):
    return self

  def token_to_id(self, _name):
    return None

  def decode(self, ids):
    return list(ids)


def original_side(spec: dict) -> dict:
  """Times the original generate.py's generate() on its tiny model (fp32, eval)."""
  import importlib.util, time  # noqa: E401
  import torch
  from vs_original_sides import original_worker
  shape = original_worker(dict(package=spec["package"], moe=None, steps=0, warmup=0,
                               compile=False))
  loader = importlib.util.spec_from_file_location(
      "vesper_original_generate", os.path.join(spec["package"], "generate.py"))
  gen = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(gen)
  torch.manual_seed(0)
  cfg = gen.VesperConfig.tiny()
  cfg.vocab_size = VOCAB
  model = gen.VesperLM(cfg).eval()
  prompt = _PromptIds(i % VOCAB for i in range(PROMPT_LEN))  # as decode_bench.py's
  times = []
  for i in range(spec["repeats"] + 1):
    torch.manual_seed(i)
    start = time.perf_counter()
    out = gen.generate(model, prompt, "", max_tokens=spec["tokens"], **SAMPLING)
    times.append(time.perf_counter() - start)
    assert len(out) == PROMPT_LEN + spec["tokens"], len(out)
  return dict(shape=shape["shape"],
              versions=shape["versions"], first_call_s=round(times[0], 3),
              call_s=[round(t, 4) for t in times[1:]],
              tokens_per_s=round(spec["tokens"] / statistics.median(times[1:]), 1))


# --- the run ---------------------------------------------------------------------------

def run_original(args) -> dict:
  spec = dict(package=str(args.package), repeats=args.repeats, tokens=args.tokens)
  return vs._run_json([sys.executable, str(Path(__file__).resolve()), "--side-original",
                       json.dumps(spec)], "the original's generate")


def run_ours(args) -> dict:
  s = SAMPLING
  cmd = [sys.executable, str(Path(__file__).resolve().parent / "decode_bench.py"),
         "--preset", "tiny", "--vocab", str(VOCAB), "--prompt-len", str(PROMPT_LEN),
         "--tokens", str(args.tokens), "--repeats", str(args.repeats),
         "--temperature", str(s["temperature"]), "--top-k", str(s["top_k"]),
         "--top-p", str(s["top_p"]), "--repetition-penalty", str(s["repetition_penalty"])]
  return vs._run_json(cmd, "vesperjax's decode")


def check_shapes(original: dict, ours: dict) -> int:
  """Refused unless the models match; the original's extra parameters otherwise."""
  diff = [f"{k}: original {original.get(k)!r}, vesperjax {ours.get(k)!r}"
          for k in SHAPE_FIELDS if original.get(k) != ours.get(k)]
  if diff:
    raise vs.Refused("the two models differ (" + "; ".join(diff) + ")")
  got, want = original["params"] - ours["params"], vs.expected_param_difference(ours)
  if got != want:
    raise vs.Refused(f"parameter counts differ by {got:,}, not the {want:,} the "
                     "original's trainable LoRA down-projections and biases account for")
  return got


def round_rates(original: dict, ours: dict) -> dict:
  """tokens/s of each column in one round."""
  return dict(original=original["tokens_per_s"], loop=ours["loop_tokens_per_s"],
              streaming=ours["streaming_tokens_per_s"])


def summarize(rounds: list[dict]) -> dict:
  """Medians over the rounds, and each of ours over the original's."""
  med = {c: statistics.median(r["tokens_per_s"][c] for r in rounds) for c, _ in COLUMNS}
  return dict(rounds=len(rounds), median_tokens_per_s=med,
              loop_over_original=med["loop"] / med["original"],
              streaming_over_original=med["streaming"] / med["original"],
              streaming_over_loop=med["streaming"] / med["loop"])


def format_report(report: dict) -> str:
  st, s = report["setting"], report["summary"]
  lines = vs.report_head(report) + [
      f"setting: tiny, vocab {VOCAB}, fp32, random init, batch 1, prompt {PROMPT_LEN}, "
      f"{st['tokens']} new tokens; temperature {SAMPLING['temperature']}, top-k "
      f"{SAMPLING['top_k']}, top-p {SAMPLING['top_p']}, repetition penalty "
      f"{SAMPLING['repetition_penalty']} on both sides; median of {st['repeats']} calls "
      "after a warm-up call, prompt included; the original re-runs the whole context per "
      "token, ours decodes with a KV cache",
      f"models: the same shapes; the original trains {report['param_difference']:,} more "
      "parameters (its LoRA down-projections and biases)",
      "",
      "round  first       " + "  ".join(f"{title:>19}" for _, title in COLUMNS)
      + "   (tokens/s)"]
  for r in report["rounds"]:
    lines.append(f"{r['round']:>5}  {r['order'][0]:<10}  " + "  ".join(
        f"{r['tokens_per_s'][c]:>19.1f}" for c, _ in COLUMNS))
  med = s["median_tokens_per_s"]
  lines += [
      "",
      f"median over {s['rounds']} round(s): original {med['original']:.1f} tokens/s; "
      f"vesperjax compiled loop {med['loop']:.1f} ({s['loop_over_original']:.2f}x the "
      f"original), streaming {med['streaming']:.1f} ({s['streaming_over_original']:.2f}x; "
      f"{s['streaming_over_loop']:.2f}x our loop)"]
  return "\n".join(lines)


def run(args, argv: list[str]) -> dict:
  import importlib.util
  if importlib.util.find_spec("torch") is None:
    raise vs.Refused(f"torch is not installed in {sys.executable}; the original's side "
                     "needs it: pip install torch (the CPU wheel is enough)")
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", os.path.relpath(Path(__file__).resolve(), Path.cwd()),
                          *argv]),
      machine=vs.machine_info(),
      setting=dict(tokens=args.tokens, repeats=args.repeats, rounds=args.rounds,
                   prompt_len=PROMPT_LEN, vocab=VOCAB, **SAMPLING),
      rounds=[])
  for i in range(1, args.rounds + 1):
    order = ("original", "vesperjax") if i % 2 else ("vesperjax", "original")
    got = {}
    for side in order:
      got[side] = run_original(args) if side == "original" else run_ours(args)
      print(f"round {i}/{args.rounds} {side} done", file=sys.stderr, flush=True)
    report["param_difference"] = check_shapes(got["original"]["shape"],
                                              got["vesperjax"]["shape"])
    report["rounds"].append(dict(round=i, order=list(order),
                                 tokens_per_s=round_rates(got["original"],
                                                          got["vesperjax"]),
                                 original=got["original"], vesperjax=got["vesperjax"]))
  report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  first = report["rounds"][0]
  report["versions"] = dict(
      first["original"]["versions"], jax=first["vesperjax"].get("jax"),
      vesperjax_git=vs._git(ROOT), original_git=vs._git(args.package),
      original_path=str(args.package))
  report["summary"] = summarize(report["rounds"])
  return report


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["--side-original"]:  # the original's side, started by run_original
    print(json.dumps(original_side(json.loads(argv[1]))))
    return 0
  return vs.report_main(argv, parse_args, run, format_report)


if __name__ == "__main__":
  sys.exit(main())
