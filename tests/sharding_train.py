"""A tiny sharded training loop on the vesperjax.sharding API, shared by the sharding
tests and run as a script for the multi-process test.

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


def build(cfg, mesh, lr: float = 1e-2):
  """(graphdef, sharded state, state shardings) of (model, adamw optimizer)."""
  import jax
  import optax
  from flax import nnx

  from vesperjax import sharding
  from vesperjax.model.transformer import VesperLM

  def create():
    model = VesperLM(cfg, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)

  return sharding.init_sharded(create, mesh)


def make_step(graphdef, shardings, mesh):
  """jit of one adamw step over (state, tokens) with the rule-given shardings."""
  import jax
  import optax
  from flax import nnx

  from vesperjax import sharding

  def step(state, tokens):
    model, opt = nnx.merge(graphdef, state)

    def loss_fn(model):
      logits, aux = model(tokens[:, :-1])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
      if aux:
        loss = loss + model.config.moe_aux_weight * aux["load_balance_loss"]
      return loss

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return nnx.state((model, opt)), loss

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, None), donate_argnums=0)


def train(cfg, mesh, steps: int = 3, data=None, hlo: bool = False):
  """Losses of `steps` adamw steps on `mesh` (every process gets the same list).

  Returns (losses, final state, compiled HLO text or None): the step is lowered and
  compiled once, so the HLO inspected is the one that ran.
  """
  import jax

  from vesperjax import sharding

  data = batches(steps) if data is None else data
  graphdef, state, shardings = build(cfg, mesh)
  bs = sharding.batch_sharding(mesh)
  n, i = jax.process_count(), jax.process_index()
  losses, compiled = [], None
  with jax.set_mesh(mesh):
    for tokens in data:
      rows = tokens.shape[0] // n
      local = tokens[i * rows:(i + 1) * rows]  # this process's share of the batch
      batch = sharding.global_batch_from_host(local, mesh, bs)
      if compiled is None:
        compiled = make_step(graphdef, shardings, mesh).lower(state, batch).compile()
      state, loss = compiled(state, batch)
      losses.append(float(loss))
  return losses, state, (compiled.as_text() if hlo else None)


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
  from vesperjax import sharding
  sharding.maybe_initialize_distributed()
  mesh = sharding.make_mesh(**_mesh_arg(a.mesh))
  losses, _, _ = train(tiny_config(a.moe), mesh, a.steps)
  print(json.dumps({"losses": losses, "process": jax.process_index(),
                    "devices": jax.device_count()}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
