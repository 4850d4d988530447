"""`python -m vesperjax.plan --config FILE --target h100-80gb`: plan a GPU run on a CPU host.

Compiles the real train step (`train_step.sharded_steps`) with XLA:GPU for N compile-only
devices of a target card (`vesperjax.planning.gpu_targets`: no GPU needed) and reports parameters,
per-device memory against the card, compile time, collectives and custom kernels;
`--max-batch` finds the largest global batch that fits under each remat policy;
`--tokens T` prints the Chinchilla auto-scale (20 tokens per parameter).

    python -m vesperjax.plan --config experiments/large.py --target h100-80gb
        [--devices 8 --config.mesh.fsdp=8] [--max-batch] [--json] [--tokens 2B]

How memory is counted and how --max-batch searches: `vesperjax.planning.program`.
"""
from __future__ import annotations

from vesperjax.planning import gpu_targets  # noqa: F401  first: sets JAX_SKIP_CUDA_CONSTRAINTS_CHECK

import json
import sys

from absl import flags
from ml_collections import config_flags

from vesperjax.cli import load_run_config, run_cli
from vesperjax.planning.program import Program, check_target, for_cuda, max_batch, plan_step
from vesperjax.planning.search import chinchilla, parse_tokens
from vesperjax.planning.search import fmt_bytes as _gib


# ---------------------------------------------------------------------------------------
# CLI

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          flag_values=FLAGS, lock_config=True)
_TARGET = flags.DEFINE_string("target", None, f"GPU to plan for: {', '.join(gpu_targets.TARGETS)}.",
                              flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices", 1, "Devices of the target (one host).",
                                flag_values=FLAGS)
_MEM_FRACTION = flags.DEFINE_float(
    "mem-fraction", 0.75, "Share of the card's memory a run may use (JAX preallocates "
    "XLA_PYTHON_CLIENT_MEM_FRACTION=.75 by default).", flag_values=FLAGS)
_MAX_BATCH = flags.DEFINE_bool("max-batch", False, "Find the largest global batch that "
                               "fits under each remat policy.", flag_values=FLAGS)
_POLICIES = flags.DEFINE_list("remat-policies", ["none", "full", "dots", "dots_no_batch"],
                              "--max-batch: the remat policies to try.", flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on stdout.",
                          flag_values=FLAGS)
_TOKENS = flags.DEFINE_string("tokens", None, "Token budget (2e9, 500M, 2B) or a token "
                              "cache directory: Chinchilla auto-scale.", flag_values=FLAGS)


def format_plan(p: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  mem = p["per_device_bytes"]
  match = ("matches" if p["params_trainable"] == p["params_analytic"]
           else "MISMATCH with")
  share = mem["total"] / p["budget_bytes"]
  lines = [
      f"plan: {p['preset']} on {p['devices']} x {p['target']} ({p['device_kind']}), "
      f"mesh {mesh}",
      f"  batch {p['batch_size']} x seq {p['seq_len']}, grad_accum {p['grad_accum']}, "
      f"remat {p['remat']}, vocab {p['vocab_size']}",
      f"parameters: {p['params_total']:,} total = {p['params_trainable']:,} trainable + "
      f"{p['params_frozen']:,} frozen (FlyLoRA A, routing biases); trainable {match} "
      f"num_params {p['params_analytic']:,}",
      "per-device memory:",
      f"  arguments    {_gib(mem['arguments'])}  (state + token batch)",
      f"  outputs      {_gib(mem['outputs'])}  ({_gib(mem['aliased'])} of it aliased to "
      "the donated state)",
      f"  temporaries  {_gib(mem['temp'])}",
      f"  total        {_gib(mem['total'])}  = arguments + outputs - aliased + temporaries",
      f"  card         {_gib(p['device_memory_bytes'])}; budget {_gib(p['budget_bytes'])} "
      f"= mem_fraction {p['mem_fraction']} (JAX preallocates 75% by default)",
      f"  fits         {'yes' if p['fits'] else 'NO'} ({share:.1%} of the budget)",
      f"compile: {p['compile_s']} s (trace + lower {p['lower_s']} s)",
      "collectives: " + (", ".join(f"{k} x{v}" for k, v in p["collectives"].items())
                         or "none"),
      "custom calls: " + (", ".join(f"{k} x{v}" for k, v in p["custom_calls"].items())
                          or "none"),
  ]
  return "\n".join(lines)


def format_max_batch(rows: list[dict]) -> str:
  r0 = rows[0]
  lines = [f"max batch at seq {r0['seq_len']} (multiples of {r0['divisor']}, budget "
           f"{_gib(r0['budget_bytes'])}):",
           f"  {'remat':<14} {'max batch':>9} {'per device':>12} {'next step':>12} "
           f"{'compiles':>8}"]
  for r in rows:
    mb = f"{r['max_batch']}{'+' if r['capped'] else ''}"
    lines.append(f"  {r['remat']:<14} {mb:>9} {_gib(r['per_device_bytes']):>12} "
                 f"{_gib(r['next_bytes']):>12} {r['compiles']:>8}")
  return "\n".join(lines)


def format_chinchilla(c: dict) -> str:
  return (f"tokens: {c['tokens']:,} -> compute-optimal {c['params_optimal']:,.0f} "
          f"parameters ({c['tokens_per_param']} tokens each)\n"
          f"  nearest preset: {c['preset']} ({c['preset_params']:,} parameters at vocab "
          f"{c['vocab_size']})\n"
          f"  steps: {c['steps']:,} at {c['tokens_per_step']:,} tokens per step "
          "(batch_size x grad_accum x seq_len)")


def _body() -> int:
  from vesperjax.config import REMAT_POLICIES
  run = load_run_config(_CONFIG)
  target, devices, fraction = _TARGET.value, _DEVICES.value, _MEM_FRACTION.value
  tokens = parse_tokens(_TOKENS.value) if _TOKENS.value is not None else None
  if target is None and tokens is None:
    raise ValueError("--target is required (h100-80gb, h200, a100-80gb), unless --tokens "
                     "is given")
  if target is None and _MAX_BATCH.value:
    raise ValueError("--max-batch needs --target")
  for policy in _POLICIES.value:
    if policy not in REMAT_POLICIES:
      raise ValueError(f"--remat-policies: unknown policy {policy!r}; choose from "
                       f"{', '.join(REMAT_POLICIES)}")
  out: dict = {}
  progress = lambda msg: print(msg, file=sys.stderr, flush=True)
  if target is not None:  # every input check first, then the compiles
    check_target(target, devices, fraction)
    Program(for_cuda(run), target, devices).check_batch(run.train.batch_size)
  if tokens is not None:
    out["chinchilla"] = chinchilla(run, tokens)
    if not _JSON.value:
      print(format_chinchilla(out["chinchilla"]), flush=True)
  if target is not None:
    out.update(plan_step(run, target=target, devices=devices, mem_fraction=fraction,
                         progress=progress))
    if not _JSON.value:
      print(format_plan(out), flush=True)
    if _MAX_BATCH.value:
      out["max_batch"] = [max_batch(run, target=target, devices=devices, remat=p,
                                    mem_fraction=fraction, progress=progress)
                          for p in _POLICIES.value]
      if not _JSON.value:
        print(format_max_batch(out["max_batch"]), flush=True)
  if _JSON.value:
    print(json.dumps(out, indent=1))
  return 0


def main(argv=None) -> int:
  return run_cli(list(sys.argv if argv is None else argv), _body, flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
