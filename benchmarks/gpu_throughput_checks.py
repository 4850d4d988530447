"""Section 3 of benchmarks/gpu_acceptance.py: bf16 train-step throughput, MFU and memory
of small / medium / xlarge on one GPU (tiny stand-ins, fp32, in --reduced mode on a CPU),
each row beside its deviceless memory plan. docs/gpu-acceptance.md says what is measured.
"""
from __future__ import annotations

import json, math, time  # noqa: E401
from pathlib import Path

import jax
import numpy as np

from gpu_kernel_checks import _err

VOCAB = 32768
MEM_FRACTION = 0.95  # XLA's share of the card, children's default: xlarge B=8 on 80 GB
# preset: (batch, seq_len), each fitting an 80 GB card by its deviceless compile
# (`python -m vesperjax.plan`, docs/gpu.md).
MODELS = {"small": (32, 2048), "medium": (32, 2048), "xlarge": (8, 2048)}
REDUCED_HIDDEN = {"small": 64, "medium": 96, "xlarge": 128}  # 2 layers, vocab 512, 2 x 32


def model_run(preset, reduced):
  """(RunConfig, batch, seq_len) of one throughput row."""
  from vesperjax.run_config import RunConfig, default_run_config
  run, h = default_run_config(preset), REDUCED_HIDDEN[preset]
  batch, seq = (2, 32) if reduced else MODELS[preset]
  run.model.update(dict(hidden_size=h, num_heads=2, ffn_size=2 * h, num_layers=2,
                        vocab_size=512) if reduced else dict(vocab_size=VOCAB))
  run.data.seq_len, run.train.batch_size, run.train.grad_accum = seq, batch, 1
  run.model.dtype = "auto" if reduced else "bfloat16"  # auto: fp32 on the CPU
  run.optim.name, run.mesh.data = "velvet", 1
  return RunConfig.from_config_dict(run), batch, seq


def _peak_flops(kind):
  # vesperjax.training.actions, not the trainer: the trainer imports grain, absent on the device
  from vesperjax.training.actions import PEAK_FLOPS  # pylint: disable=g-import-not-at-top
  return next((p for k, p in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def throughput_one(ctx, preset):
  from vesperjax import sharding
  from vesperjax.run_config import model_config
  from vesperjax.training.train_step import flops_per_token, sharded_steps
  run, batch, seq = model_run(preset, ctx.reduced)
  config, rng = model_config(run), np.random.default_rng(0)
  warmup, n = (1, 3) if ctx.reduced else (2, 10)
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
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
  peak, loss = _peak_flops(ctx.device["kind"]), float(metrics["loss"])
  return dict(
      preset=preset, status="ok" if math.isfinite(loss) else "non-finite loss",
      hidden=config.hidden_size, layers=config.num_layers, vocab=config.vocab_size,
      batch=batch, seq_len=seq, dtype=np.dtype(config.compute_dtype()).name,
      optimizer="velvet", params=sum(int(x.size) for x in jax.tree.leaves(state.params)),
      compile_s=round(compile_s, 2), warmup=warmup, steps=n, step_s_median=step_s,
      step_s_min=min(times[warmup:]), step_s_max=max(times[warmup:]), tokens_per_step=tokens,
      tokens_per_s=tokens / step_s, flops_per_token=fpt, peak_flops=peak,
      mfu=tokens / step_s * fpt / peak if peak else None, final_loss=loss,
      measured_peak_bytes=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"),
      measured_note=("peak_bytes_in_use of a fresh process running this model only"
                     if "peak_bytes_in_use" in stats else "no allocator stats (CPU)"),
      compiler_bytes=mem, plan_bytes=None)


def plan_figure(ctx, row, run):
  """The deviceless plan's total: prepared by --prepare, else vesperjax.plan here."""
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
    return dict(plan_note=_err(e, 200))


def section_throughput(ctx, res, save):
  res["models"] = []
  for preset in ctx.args.models.split(","):
    try:
      res["models"].append(throughput_one(ctx, preset))
      save()  # before the plan: a time box ending in a plan's compile keeps the row
      res["models"][-1].update(plan_figure(ctx, res["models"][-1],
                                           model_run(preset, ctx.reduced)[0]))
    except Exception as e:  # noqa: BLE001
      res["models"].append(dict(preset=preset, status="error", error=_err(e)))
    save()
