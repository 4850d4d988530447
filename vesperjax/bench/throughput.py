"""Throughput: the trainer's own jit train step, compiled once, then timed on synthetic
tokens of the model's vocabulary (no data, no tokenizer) on the run's mesh.

`python -m vesperjax.benchmark throughput --config FILE` prints `run_throughput`'s
result as one JSON line.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import numpy as np

from vesperjax.bench.yardstick import cpu_seconds, matmul_gflops, peak_memory

if TYPE_CHECKING:  # jax-free until a benchmark runs
  from vesperjax.run_config import RunConfig


def run_throughput(run: RunConfig, *, batch_size: int | None = None,
                   seq_len: int | None = None, steps: int = 10, warmup: int = 2) -> dict:
  """Time the trainer's train step on synthetic tokens; a JSON-able result."""
  import jax

  from vesperjax import sharding
  from vesperjax.training import build
  from vesperjax.training.actions import device_peak_flops
  from vesperjax.training.train_step import flops_per_token

  t = run.train
  batch_size = batch_size or t.batch_size
  seq_len = seq_len or run.data.seq_len
  if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 2:
    raise ValueError("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --seq-len >= 2")
  mesh = build.checked_mesh(run, batch_size, flag="--batch-size")
  model = build.build_model(run, mesh, vocab_size=build.model_vocab(run), seq_len=seq_len,
                            seq_flag="--seq-len")
  config = model.config
  state = model.steps.init(jax.random.key(t.seed))
  rng = np.random.default_rng(t.seed)
  host = rng.integers(0, config.vocab_size, (t.grad_accum, batch_size, seq_len + 1),
                      dtype=np.int32)
  batch = sharding.global_batch_from_host(host, mesh, model.steps.batch_sharding)

  start = time.perf_counter()
  compiled = model.steps.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, m = compiled(state, batch)
  jax.block_until_ready(state)
  yardstick = [matmul_gflops()]
  times = []
  cpu_start = cpu_seconds()
  for _ in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - start)
  cpu_per_step = (cpu_seconds() - cpu_start) / steps
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
      grad_accum=t.grad_accum, tokens_per_step=tokens,
      dtype=np.dtype(config.compute_dtype()).name,
      optimizer=run.optim.name, fused_optimizer=bool(run.optim.fused),
      fused_loss=bool(run.train.fused_loss), remat=config.remat,
      scan_layers=config.scan_layers,
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


def _count(tree) -> int:
  import jax
  return int(sum(x.size for x in jax.tree.leaves(tree)))
