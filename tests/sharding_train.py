"""Tiny sharded training on the trainer's own pieces (build_model, StepLoop), shared by
the sharding tests and run as a script for the multi-process test.

  python tests/sharding_train.py --moe --mesh data=2,expert=2 --steps 3 \
      [--coordinator 127.0.0.1:PORT --num-processes 2 --process-id 0 --local-devices 2]

prints one JSON line {"losses": [...], "process": i, "devices": n}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SEQ = 12  # 8 x 12 = 96 tokens: no weight dimension looks like an activation one
BATCH = 8


def tiny_config(moe: bool, **overrides):
  import vesperjax as vj
  base = dict(hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, vocab_size=128,
              max_seq_len=64, lora_rank=4, lora_topk=2)
  if moe:
    base.update(num_experts=4, top_k=2)
  return vj.ModelConfig(**{**base, **overrides})


def batches(steps: int, batch: int = BATCH, seq: int = SEQ, vocab: int = 128):
  """The same global token batches on every process (each slices its own rows)."""
  rng = np.random.default_rng(0)
  return rng.integers(0, vocab, (steps, batch, seq + 1), dtype=np.int32)


def tiny_run(cfg, steps: int, lr: float = 1e-2):
  """A RunConfig whose model is `cfg`: AdamW at `lr`, BATCH x SEQ tokens per step."""
  from vesperjax.run_config import RunConfig, default_run_config
  run = default_run_config("tiny")
  run.model.update({k: v for k, v in cfg.to_dict().items() if k in run.model})
  run.data.seq_len = SEQ
  run.optim.update(dict(name="adamw", lr=lr, warmup_steps=0))
  run.train.update(dict(batch_size=BATCH, grad_accum=1, max_steps=steps, seed=0,
                        fused_loss=False))
  return RunConfig.from_config_dict(run)


def train(cfg, mesh, steps: int = 3, data=None, hlo: bool = False):
  """Losses of `steps` AdamW steps on `mesh` (every process gets the same list): the
  trainer's own model, jitted steps (`build.build_model`) and step loop (`StepLoop`).

  Returns (losses, final TrainState, compiled HLO text or None): the step is lowered and
  compiled once, so the HLO inspected is the one that ran.
  """
  import jax

  from vesperjax import sharding
  from vesperjax.training import build
  from vesperjax.training.loop import StepLoop

  data = batches(steps) if data is None else data
  model = build.build_model(tiny_run(cfg, steps), mesh, vocab_size=cfg.vocab_size)
  assert model.config == cfg, (model.config, cfg)
  s = model.steps
  n, i = jax.process_count(), jax.process_index()
  rows = data.shape[1] // n
  host = iter(data)

  def next_batch():  # this process's share of the batch, as the trainer's data iterator
    local = next(host)[None, i * rows:(i + 1) * rows]
    return sharding.global_batch_from_host(local, mesh, s.batch_sharding)

  tokens = jax.ShapeDtypeStruct((1, *data.shape[1:]), data.dtype, sharding=s.batch_sharding)
  losses = []
  with jax.set_mesh(mesh):
    compiled = s.train_step.lower(s.abstract, tokens).compile()
    loop = StepLoop(compiled, next_batch,
                    [lambda info: losses.append(float(info.metrics["loss"]))],
                    s.init(jax.random.key(0)), 0)
    loop.run(len(data))
  return losses, loop.state, (compiled.as_text() if hlo else None)


def _mesh_arg(text: str) -> dict:
  return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


def main(argv=None) -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--moe", action="store_true")
  p.add_argument("--mesh", default="data=-1")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--coordinator")
  p.add_argument("--num-processes", type=int, default=1)
  p.add_argument("--process-id", type=int, default=0)
  p.add_argument("--local-devices", type=int, default=4)
  a = p.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import jax
  jax.config.update("jax_num_cpu_devices", a.local_devices)
  if a.coordinator:
    os.environ.update(JAX_COORDINATOR_ADDRESS=a.coordinator,
                      JAX_NUM_PROCESSES=str(a.num_processes),
                      JAX_PROCESS_ID=str(a.process_id))
  from vesperjax import distributed, sharding
  distributed.maybe_initialize_distributed()
  mesh = sharding.make_mesh(**_mesh_arg(a.mesh))
  losses, _, _ = train(tiny_config(a.moe), mesh, a.steps)
  print(json.dumps({"losses": losses, "process": jax.process_index(),
                    "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
