"""The throughput section of the acceptance runs: bf16 train-step throughput, MFU and
memory of small / medium / xlarge on one GPU (benchmarks/gpu_acceptance.py) or on every
chip of one TPU host, FSDP over them (tpu_acceptance.py); tiny stand-ins, fp32, in
--reduced mode on a CPU; each row beside its deviceless memory plan.
docs/gpu-acceptance.md and docs/tpu.md say what is measured.
"""
from __future__ import annotations

import json, math, time  # noqa: E401
from pathlib import Path

import jax
import numpy as np

from kernel_checks import error_text

VOCAB = 32768
MEM_FRACTION = 0.95  # XLA's share of the card, children's default: xlarge B=8 on 80 GB
# preset: (batch, seq_len), each fitting an 80 GB card by its deviceless compile
# (`python -m vesperjax.plan`, docs/gpu.md).
MODELS = {"small": (32, 2048), "medium": (32, 2048), "xlarge": (8, 2048)}
# TPU: one sequence of 2048 per chip, the plan table's column (docs/tpu.md)
TPU_MODELS = {"small": (1, 2048), "medium": (1, 2048), "xlarge": (1, 2048)}
REDUCED_HIDDEN = {"small": 64, "medium": 96, "xlarge": 128}  # 2 layers, vocab 512, 2 x 32


def model_run(preset, reduced, devices=1, models=None):
  """(RunConfig, batch, seq_len) of one throughput row; `models` (per device batch,
  seq_len) by preset (default MODELS), FSDP over `devices`."""
  from vesperjax.run_config import RunConfig, default_run_config
  run, h = default_run_config(preset), REDUCED_HIDDEN[preset]
  per_device, seq = (2, 32) if reduced else (models or MODELS)[preset]
  batch = per_device * devices
  run.model.update(dict(hidden_size=h, num_heads=2, ffn_size=2 * h, num_layers=2,
                        vocab_size=512) if reduced else dict(vocab_size=VOCAB))
  run.data.seq_len, run.train.batch_size, run.train.grad_accum = seq, batch, 1
  run.model.dtype = "auto" if reduced else "bfloat16"  # auto: fp32 on the CPU
  run.optim.name, run.mesh.data, run.mesh.fsdp = "velvet", 1, devices
  return RunConfig.from_config_dict(run), batch, seq


def throughput_one(ctx, preset):
  """(the row of `preset`, its RunConfig)."""
  from vesperjax import sharding
  from vesperjax.run_config import model_config
  from vesperjax.training.train_step import flops_per_token, sharded_steps
  tpu = ctx.backend == "tpu"  # the TPU script: every chip of the host (1 CPU when reduced)
  devices = jax.local_devices() if tpu else jax.devices()[:1]
  run, batch, seq = model_run(preset, ctx.reduced, len(devices),
                              TPU_MODELS if tpu else MODELS)
  config, rng = model_config(run), np.random.default_rng(0)
  warmup, n = (1, 3) if ctx.reduced else (2, 10)
  mesh = sharding.make_mesh(data=1, fsdp=len(devices), devices=devices)
  t = run.train
  steps = sharded_steps(config, mesh, optim=run.optim, max_steps=t.max_steps,
                        valid_vocab=config.vocab_size, fused_loss=t.fused_loss,
                        platform=t.platform)
  with jax.set_mesh(mesh):
    state = steps.init(jax.random.key(0))
    batches = [sharding.global_batch_from_host(rng.integers(
        0, config.vocab_size, (1, batch, seq + 1), dtype=np.int32), mesh,
        steps.batch_sharding) for _ in range(2)]
    start = time.perf_counter()
    compiled = steps.train_step.lower(state, batches[0]).compile()
    compile_s, times = time.perf_counter() - start, []
    for i in range(warmup + n):
      start = time.perf_counter()
      state, metrics = compiled(state, batches[i % 2])
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - start)
  ma, stats = compiled.memory_analysis(), jax.devices()[0].memory_stats() or {}
  mem = dict(arguments=ma.argument_size_in_bytes, outputs=ma.output_size_in_bytes,
             alias=ma.alias_size_in_bytes, temp=ma.temp_size_in_bytes)
  mem["total"] = mem["arguments"] + mem["outputs"] - mem["alias"] + mem["temp"]
  step_s, tokens, fpt = float(np.median(times[warmup:])), batch * seq, flops_per_token(config, seq)
  # vesperjax.training.actions, not the trainer: the trainer imports grain, absent on the device
  from vesperjax.training.actions import peak_flops  # pylint: disable=g-import-not-at-top
  peak, loss = peak_flops(ctx.device["kind"]), float(metrics["loss"])
  peak = peak and peak * len(devices)
  return dict(
      preset=preset, status="ok" if math.isfinite(loss) else "non-finite loss",
      hidden=config.hidden_size, layers=config.num_layers, vocab=config.vocab_size,
      batch=batch, seq_len=seq, devices=len(devices), dtype=np.dtype(config.compute_dtype()).name,
      optimizer="velvet", params=sum(int(x.size) for x in jax.tree.leaves(state.params)),
      compile_s=round(compile_s, 2), warmup=warmup, steps=n, step_s_median=step_s,
      step_s_min=min(times[warmup:]), step_s_max=max(times[warmup:]), tokens_per_step=tokens,
      tokens_per_s=tokens / step_s, flops_per_token=fpt, peak_flops=peak,
      mfu=tokens / step_s * fpt / peak if peak else None, final_loss=loss,
      measured_peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"),
      measured_note=("peak_bytes_in_use of a fresh process running this model only"
                     if "peak_bytes_in_use" in stats else "no allocator stats (CPU)"),
      compiler_bytes=mem, plan_bytes=None), run


def tpu_plan_figure(ctx, row, run):
  """The plan's total for this host's slice (`vesperjax.plan --target GEN`), compiled
  here for compile-only devices of the same generation and chip count."""
  if ctx.reduced:
    return dict(plan_note="reduced mode: no deviceless plan")
  from vesperjax.planning import tpu_targets  # pylint: disable=g-import-not-at-top
  from vesperjax.planning.program import plan_step  # pylint: disable=g-import-not-at-top
  target = next((name for name, g in tpu_targets.GENERATIONS.items()
                 if g.device_kind == ctx.device["kind"]), None)
  if target is None:
    return dict(plan_note=f"no plan target for {ctx.device['kind']}")
  topology = tpu_targets.GENERATIONS[target].default_topology
  if tpu_targets.chips(topology) != row["devices"]:
    return dict(plan_note=f"no plan for {row['devices']} chips (the target's {topology})")
  try:
    out = plan_step(run, target=target, topology=topology)
    return dict(plan_bytes=out["per_device_bytes"]["total"], plan_target=target,
                plan_topology=topology, plan_fits=out.get("fits"))
  except Exception as e:  # noqa: BLE001
    return dict(plan_note=error_text(e, 200))


def plan_figure(ctx, row, run):
  """The deviceless plan's total: prepared by --prepare, else vesperjax.plan here."""
  if getattr(ctx, "backend", "gpu") == "tpu":
    return tpu_plan_figure(ctx, row, run)
  target = "h200" if "h200" in ctx.device["kind"].lower() else "h100-80gb"
  key = f"{row['preset']}:b{row['batch']}:s{row['seq_len']}:{row['dtype']}:{target}"
  path = Path(ctx.args.deps) / "plans.json"
  got = json.loads(path.read_text()).get(key) if path.exists() else None
  if got:
    return dict(plan_bytes=got["total"], plan_target=target, plan_fits=got.get("fits"),
                plan_note=f"prepared with jax {got['jax']}")
  if ctx.reduced:
    return dict(plan_note="reduced mode: no deviceless plan")
  try:
    from vesperjax.planning.program import plan_step  # pylint: disable=g-import-not-at-top
    out = plan_step(run, target=target, devices=1, mem_fraction=MEM_FRACTION)
    return dict(plan_bytes=out["per_device_bytes"]["total"], plan_target=target,
                plan_fits=out.get("fits"))
  except Exception as e:  # noqa: BLE001  (absent, or its CUDA plugin is not installed)
    return dict(plan_note=error_text(e, 200))


def section_throughput(ctx, res, save):
  res["models"] = []
  for preset in ctx.args.models.split(","):
    try:
      row, run = throughput_one(ctx, preset)
      res["models"].append(row)
      save()  # before the plan: a time box ending in a plan's compile keeps the row
      row.update(plan_figure(ctx, row, run))
    except Exception as e:  # noqa: BLE001
      res["models"].append(dict(preset=preset, status="error", error=error_text(e)))
    save()
