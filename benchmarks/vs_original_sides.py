"""The two sides of benchmarks/vs_original.py, each run in its own process.

  python benchmarks/vs_original_sides.py original|original_profile|ours_describe SPEC_JSON

prints one JSON line: the original trainer's shapes and timed steps, or its per-op profile
(imported from the checkout named in SPEC, never copied here), or our model's shapes as
the experiment config builds it. vs_original.py and profile_original.py start these.
"""
from __future__ import annotations

import json, os, statistics, sys  # noqa: E401
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB, BATCH, SEQ = 8192, 8, 256
# The original trainer's argparse defaults (python/train.py) for its optimizer and schedule.
ORIGINAL_OPTIM = dict(lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3,
                      max_grad_norm=1.0)
ORIGINAL_WARMUP_STEPS, ORIGINAL_MAX_STEPS = 100, 10000
YARDSTICK = (2048, 256, 1024)  # the same matmul as vesperjax.bench.yardstick


def _cpu_seconds() -> float:
  import resource
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def _torch_matmul_gflops(seconds: float = 0.3) -> float:
  import time
  import torch
  m, k, n = YARDSTICK
  a, b = torch.ones(m, k), torch.ones(k, n)
  a @ b
  rates, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end or len(rates) < 3:
    start = time.perf_counter()
    a @ b
    rates.append(2 * m * k * n / (time.perf_counter() - start) / 1e9)
  return statistics.median(rates)


def original_step(spec: dict):
  """(step, shape, versions) of the original trainer: `step(i)` runs its training loop's
  body once; the phases are marked for torch's profiler (forward, backward, optimizer)."""
  import importlib.util, math  # noqa: E401
  import numpy as np
  import torch
  from torch.profiler import record_function
  sys.path.insert(0, spec["package"])  # its train.py imports `vesper` from beside it
  loader = importlib.util.spec_from_file_location(
      "vesper_original_train", os.path.join(spec["package"], "train.py"))
  tr = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(tr)
  torch.manual_seed(0)
  cfg = tr.VesperConfig.tiny()
  if spec["moe"]:  # as its trainer's --moe --num-experts E --top-k K
    cfg.with_moe(num_experts=spec["moe"][0], top_k=spec["moe"][1])
  cfg.vocab_size, cfg.max_position_embeddings = VOCAB, SEQ  # --vocab-size, --seq-len
  cfg.validate()
  model = tr.VesperLM(cfg)  # fp32: its --dtype fp32
  moe = cfg.moe_enabled
  shape = dict(
      vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.num_layers,
      heads=cfg.num_heads, ffn=cfg.intermediate_size, lora_rank=cfg.flylora_rank,
      lora_alpha=float(cfg.flylora_alpha), lora_sparsity=float(cfg.flylora_sparsity),
      era_gamma=float(cfg.era_gamma), experts=cfg.moe_num_experts if moe else 0,
      top_k=cfg.moe_top_k if moe else 0,
      aux_weight=float(cfg.moe_aux_loss_weight) if moe else 0.0,
      norm_eps=float(cfg.layer_norm_eps), rope_theta=float(cfg.rope_theta),
      dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
      optimizer="velvet", max_grad_norm=ORIGINAL_OPTIM["max_grad_norm"],
      params=int(model.num_parameters()))
  versions = dict(torch=torch.__version__, torch_threads=torch.get_num_threads())
  if not spec["steps"]:
    return None, shape, versions

  if spec.get("compile"):
    model = torch.compile(model)
  model.train()
  o = ORIGINAL_OPTIM
  optimizer = tr.VelvetOptimizer(model.parameters(), lr=o["lr"], betas=o["betas"],
                                 eps=o["eps"], weight_decay=o["weight_decay"],
                                 max_grad_norm=o["max_grad_norm"], entropy_adaptive=True,
                                 perplexity_guided=True)
  host = np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 1))
  tokens = torch.from_numpy(host).long()
  input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

  def step(i: int) -> float:  # its train() loop body at grad_accum 1 (GradScaler off)
    with record_function("forward"):
      logits, aux_loss = model(input_ids)
      loss = tr.compute_loss(logits, labels, cfg.vocab_size, aux_loss=aux_loss,
                             aux_loss_weight=cfg.moe_aux_loss_weight)
    with record_function("backward"):
      loss.backward()
    loss_item = loss.item()
    if not math.isfinite(loss_item):
      optimizer.zero_grad()
      return loss_item
    with record_function("optimizer"):
      tr.set_lr(optimizer, tr.get_lr(i, ORIGINAL_WARMUP_STEPS, ORIGINAL_MAX_STEPS, o["lr"],
                                     o["lr"] * 0.1))
      grad_norm = optimizer.clip_grad_norm_()
      if not math.isfinite(grad_norm):
        optimizer.zero_grad()
        return loss_item
      optimizer.step()
      optimizer.zero_grad()
      optimizer.set_loss_metrics(loss_item, cfg.vocab_size)
    return loss_item

  return step, shape, versions


def original_worker(spec: dict) -> dict:
  """The original trainer's timed steps; steps 0: the shapes only."""
  import time
  step, shape, versions = original_step(spec)
  if step is None:
    return dict(shape=shape, versions=versions)
  for i in range(spec["warmup"]):
    step(i)
  yardstick = [_torch_matmul_gflops()]
  times, cpu_start = [], _cpu_seconds()
  for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    loss = step(i)
    times.append(time.perf_counter() - start)
  cpu = (_cpu_seconds() - cpu_start) / spec["steps"]
  yardstick.append(_torch_matmul_gflops())
  return dict(shape=shape, versions=versions, timing=dict(
      median_s=statistics.median(times), min_s=min(times), max_s=max(times),
      yardstick_gflops=[round(x, 1) for x in yardstick], cpu_s_per_step=cpu, loss=loss,
      times_s=times))


def original_profile_worker(spec: dict) -> dict:
  """The original's steps under torch's profiler: per aten op, self CPU ms per step
  (summed over its threads' calls) and calls per step; per phase, ms per step."""
  import time
  from torch.profiler import ProfilerActivity, profile
  step, shape, versions = original_step(spec)
  for i in range(spec["warmup"]):
    step(i)
  n = spec["steps"]
  cpu_start = _cpu_seconds()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for i in range(spec["warmup"], spec["warmup"] + n):
      step(i)
    wall = (time.perf_counter() - start) / n
  cpu = (_cpu_seconds() - cpu_start) / n
  ops, phases = {}, {}
  for e in prof.key_averages():
    if e.key in ("forward", "backward", "optimizer"):
      phases[e.key] = e.cpu_time_total / 1000 / n
    elif e.self_cpu_time_total > 0:
      ops[e.key] = dict(ms=e.self_cpu_time_total / 1000 / n, calls=e.count / n)
  return dict(shape=shape, versions=versions, wall_s=wall, cpu_s_per_step=cpu,
              ops=ops, phases=phases)


def ours_describe_worker(spec: dict) -> dict:
  """Our model's shapes and parameter count as the experiment config builds it."""
  import importlib.util
  import numpy as np
  from vesperjax.model.size import num_params
  from vesperjax.run_config import RunConfig, model_config
  loader = importlib.util.spec_from_file_location("experiment", ROOT / spec["config"])
  mod = importlib.util.module_from_spec(loader)
  loader.loader.exec_module(mod)
  cd = mod.get_config()
  cd.model.vocab_size = VOCAB  # --config.model.vocab_size=8192
  run = RunConfig.from_config_dict(cd)
  c = model_config(run)
  return dict(shape=dict(
      vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_layers, heads=c.num_heads,
      ffn=c.ffn_size, lora_rank=c.lora_rank, lora_alpha=float(c.lora_alpha),
      lora_sparsity=c.lora_topk / c.lora_rank, era_gamma=float(c.era_gamma),
      experts=c.num_experts, top_k=c.top_k if c.is_moe else 0,
      aux_weight=float(c.moe_aux_weight) if c.is_moe else 0.0, norm_eps=float(c.norm_eps),
      rope_theta=float(c.rope_theta), dtype=np.dtype(c.compute_dtype()).name,
      optimizer=run.optim.name, max_grad_norm=float(run.optim.max_grad_norm),
      params=int(num_params(c))))


WORKERS = {"original": original_worker, "original_profile": original_profile_worker,
           "ours_describe": ours_describe_worker}


if __name__ == "__main__":
  print(json.dumps(WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))
