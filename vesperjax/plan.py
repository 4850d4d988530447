"""`python -m vesperjax.plan --config FILE --target h100-80gb|v5e`: plan a GPU or TPU run
on a CPU host.

Compiles the real train step (`train_step.sharded_steps`) for compile-only devices: XLA:GPU
for N devices of a target card (`vesperjax.planning.gpu_targets`: no GPU needed), or
libtpu for a TPU slice of a topology (`vesperjax.planning.tpu_targets`: no TPU needed).
Reports parameters, per-device memory against the card or chip, compile time, FLOPs,
collectives and custom kernels; `--max-batch` finds the largest global batch that fits
under each remat policy; `--tokens T` prints the Chinchilla auto-scale (20 tokens per
parameter).

    python -m vesperjax.plan --config experiments/large.py --target h100-80gb
        [--devices 8 --config.mesh.fsdp=8] [--max-batch] [--json] [--tokens 2B]
    python -m vesperjax.plan --config experiments/large.py --target v5e
        [--topology 4x4 --config.mesh.fsdp=16] [--max-batch] [--json]

How memory is counted and how --max-batch searches: `vesperjax.planning.program`.
"""
from __future__ import annotations

# first: sets the deviceless compiles' environment
from vesperjax.planning import gpu_targets, targets, tpu_targets

import json
import sys

from absl import flags
from ml_collections import config_flags

from vesperjax.cli import load_run_config, run_cli
from vesperjax.planning.program import (Program, check_target, for_platform, max_batch,
                                        plan_step)
from vesperjax.planning.search import chinchilla, parse_tokens
from vesperjax.planning.search import fmt_bytes as _gib


# ---------------------------------------------------------------------------------------
# CLI

FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          flag_values=FLAGS, lock_config=True)
_TARGET = flags.DEFINE_string(
    "target", None, f"GPU ({', '.join(gpu_targets.TARGETS)}) or TPU generation "
    f"({', '.join(tpu_targets.TARGETS)}) to plan for.", flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices", 1, "GPU target: devices of the card (one host).",
                                flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU target: the slice's chips, AxB (v5e, v6e) or AxBxC (v4, v5p); "
    "default: " + ", ".join(f"{n} {g.default_topology}"
                            for n, g in tpu_targets.GENERATIONS.items()) + ".",
    flag_values=FLAGS)
_MEM_FRACTION = flags.DEFINE_float(
    "mem-fraction", 0.75, "Share of the card's or chip's memory a run may use (on a GPU, "
    "JAX preallocates XLA_PYTHON_CLIENT_MEM_FRACTION=.75 by default; on a TPU it is "
    "headroom).", flag_values=FLAGS)
_MAX_BATCH = flags.DEFINE_bool("max-batch", False, "Find the largest global batch that "
                               "fits under each remat policy.", flag_values=FLAGS)
_POLICIES = flags.DEFINE_list("remat-policies", ["none", "full", "dots", "dots_no_batch"],
                              "--max-batch: the remat policies to try.", flag_values=FLAGS)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on stdout.",
                          flag_values=FLAGS)
_TOKENS = flags.DEFINE_string("tokens", None, "Token budget (2e9, 500M, 2B) or a token "
                              "cache directory: Chinchilla auto-scale.", flag_values=FLAGS)


_KERNELS = ("attention", "cross_entropy", "grouped_matmul", "velvet_kernel")


def format_plan(p: dict) -> str:
  mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
  mem = p["per_device_bytes"]
  match = ("matches" if p["params_trainable"] == p["params_analytic"]
           else "MISMATCH with")
  share = mem["total"] / p["budget_bytes"]
  tpu = p["kind"] == "tpu"
  if tpu:
    hosts = f"{p['hosts']} host{'s' if p['hosts'] > 1 else ''}"
    where = f"{p['target']} {p['topology']} ({p['devices']} chips, {hosts})"
  else:
    where = f"{p['devices']} x {p['target']}"
  lines = [
      f"plan: {p['preset']} on {where} ({p['device_kind']}), mesh {mesh}",
      f"  batch {p['batch_size']} x seq {p['seq_len']}, grad_accum {p['grad_accum']}, "
      f"remat {p['remat']}, vocab {p['vocab_size']}",
      f"parameters: {p['params_total']:,} total = {p['params_trainable']:,} trainable + "
      f"{p['params_frozen']:,} frozen (FlyLoRA A, routing biases); trainable {match} "
      f"num_params {p['params_analytic']:,}",
      "per-device memory:"]
  refused = p.get("compiler_refused")
  if refused:
    lines.append(f"  libtpu refused the compile: {_gib(refused['required_bytes'])} required, "
                 f"{_gib(refused['available_bytes'])} available")
  else:
    lines += [
        f"  arguments    {_gib(mem['arguments'])}  (state + token batch)",
        f"  outputs      {_gib(mem['outputs'])}  ({_gib(mem['aliased'])} of it aliased to "
        "the donated state)"]
    if tpu:
      lines += [
          f"  temporaries  {_gib(mem['temp'])}  (libtpu's temp allocation, not the live "
          "figure)",
          f"  code         {_gib(mem['code'])}  (the program, held in HBM)",
          f"  total        {_gib(mem['total'])}  = libtpu's peak of live buffers (arguments "
          "included), what it checks against the chip"]
    else:
      lines += [
          f"  temporaries  {_gib(mem['temp'])}",
          f"  total        {_gib(mem['total'])}  = arguments + outputs - aliased + "
          "temporaries"]
  why = ("a TPU has no preallocation: headroom" if tpu
         else "JAX preallocates 75% by default")
  lines += [
      f"  {'chip' if tpu else 'card'}         {_gib(p['device_memory_bytes'])}; budget "
      f"{_gib(p['budget_bytes'])} = mem_fraction {p['mem_fraction']} ({why})",
      f"  fits         {'yes' if p['fits'] else 'NO'} ({share:.1%} of the budget)",
      f"compile: {p['compile_s']} s (trace + lower {p['lower_s']} s)"]
  if not refused:
    xla = "n/a" if p["xla_flops"] is None else f"{p['xla_flops']:.3g}"
    lines += [
        f"flops: model {p['model_flops']:.3g} per step (train_step.flops_per_token x "
        f"tokens); XLA cost analysis {xla} per device (a loop body counted once)",
        "collectives: " + (", ".join(f"{k} x{v}" for k, v in p["collectives"].items())
                           or "none"),
        "custom calls: " + (", ".join(f"{k} x{v}" for k, v in p["custom_calls"].items())
                            or "none"),
        f"kernels ({'tpu' if tpu else 'cuda'} row of kernels.platform.CHOICES, first that "
        "applies): " + ", ".join(
            f"{k} {'/'.join(map(str, v)) if isinstance(v, tuple) else v}"
            + (" (with optim.fused)" if k == "velvet_kernel" else "")
            for k, v in p["choices"].items() if k in _KERNELS)]
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
  topology = _TOPOLOGY.value
  tokens = parse_tokens(_TOKENS.value) if _TOKENS.value is not None else None
  if target is None and tokens is None:
    raise ValueError(f"--target is required ({', '.join(targets.NAMES)}), unless --tokens "
                     "is given")
  if target is None and topology is not None:
    raise ValueError("--topology needs a TPU --target")
  if target is None and _MAX_BATCH.value:
    raise ValueError("--max-batch needs --target")
  for policy in _POLICIES.value:
    if policy not in REMAT_POLICIES:
      raise ValueError(f"--remat-policies: unknown policy {policy!r}; choose from "
                       f"{', '.join(REMAT_POLICIES)}")
  out: dict = {}
  progress = lambda msg: print(msg, file=sys.stderr, flush=True)
  if target is not None:  # every input check first, then the compiles
    checked = check_target(target, devices, fraction, topology)
    Program(for_platform(run, checked.platform), target, devices,
            topology).check_batch(run.train.batch_size)
  if tokens is not None:
    out["chinchilla"] = chinchilla(run, tokens)
    if not _JSON.value:
      print(format_chinchilla(out["chinchilla"]), flush=True)
  if target is not None:
    out.update(plan_step(run, target=target, devices=devices, topology=topology,
                         mem_fraction=fraction, progress=progress))
    if not _JSON.value:
      print(format_plan(out), flush=True)
    if _MAX_BATCH.value:
      out["max_batch"] = [max_batch(run, target=target, devices=devices,
                                    topology=topology, remat=p, mem_fraction=fraction,
                                    progress=progress)
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
