"""Collectives of the compiled sharded train step (tiny model, simulated CPU devices).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/sharding_hlo.py [--moe] [--mesh fsdp=8] [--pin]

Lists each all-gather / all-reduce / all-to-all with its shape and source op, and flags
"activation" gathers (leading dims = batch x seq or tokens). --pin patches the model the
way docs/scaling.md asks: block activations pinned to the batch axes with
`sharding.constrain`, logits to (batch, None, vocab), FlyLoRA's top-k via
`vesperjax.kernels.partitionable_top_k`; compare the two listings.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pin_model() -> None:
  """What the model code should do (see docs/scaling.md), applied by patching."""
  import jax
  import jax.numpy as jnp

  from vesperjax import sharding as sh
  from vesperjax.kernels import partitionable_top_k
  from vesperjax.model import layers, transformer

  act = ("batch", None, None)
  block_call = transformer.Block.__call__

  def call(self, x, positions, cache=None):
    x, aux, cache = block_call(self, sh.constrain(x, act), positions, cache)
    return sh.constrain(x, act), aux, cache

  logits = transformer.VesperLM.logits
  transformer.Block.__call__ = call
  transformer.VesperLM.logits = lambda self, h: sh.constrain(
      logits(self, sh.constrain(h, act)), ("batch", None, "vocab"))

  def rank_topk_mask(y, bias, k):
    _, idx = partitionable_top_k(jnp.abs(y.astype(jnp.float32) + bias), k)
    return jax.nn.one_hot(idx, y.shape[-1], dtype=y.dtype).sum(-2)

  layers.rank_topk_mask = rank_topk_mask


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--moe", action="store_true")
  p.add_argument("--mesh", default="fsdp=8")
  p.add_argument("--pin", action="store_true")
  a = p.parse_args()
  if a.pin:
    pin_model()
  from tests import sharding_train as st
  from vesperjax import sharding as sh

  mesh = sh.make_mesh(**st._mesh_arg(a.mesh))
  hlo = st.train(st.tiny_config(a.moe), mesh, 1, hlo=True)[2]
  b, s = st.BATCH, st.SEQ
  bad = 0
  for c in sh.hlo_collectives(hlo):
    act = any(x[:2] == (b, s) or (x and x[0] in (b * s, 2 * b * s)) for x in c["shapes"])
    bad += act and c["kind"] == "all-gather"
    flag = "ACTIVATION " if act and c["kind"] == "all-gather" else ""
    print(f"{flag}{c['kind']:12s} {str(c['shapes'][:3]):40s} {c['op_name'][-70:]}")
  print(f"{bad} activation all-gathers (mesh {dict(mesh.shape)}, moe={a.moe}, pin={a.pin})")


if __name__ == "__main__":
  main()
