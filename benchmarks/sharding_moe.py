"""MoE dispatch under expert parallelism on simulated CPU devices: the shard_map
all_to_all path (dropless and with a capacity factor) vs the plain pjit path (XLA
places the sort-based ragged_dot MoE itself).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/sharding_moe.py [--mesh data=2,expert=4] [--tokens 2048]

Prints ms per forward+backward of one MoE layer and the collectives XLA emitted.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--mesh", default="data=2,expert=4")
  p.add_argument("--tokens", type=int, default=2048)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--ffn", type=int, default=1024)
  p.add_argument("--experts", type=int, default=4)
  p.add_argument("--repeats", type=int, default=5)
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  from flax import nnx

  import vesperjax as vj
  from vesperjax import sharding as sh
  from vesperjax.model import moe as moe_lib

  mesh = sh.make_mesh(**{k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(","))})
  print(f"mesh {dict(mesh.shape)}, {a.tokens} tokens, hidden {a.hidden}, ffn {a.ffn}, "
        f"{a.experts} experts top-2")
  for name, ep, cf in [("pjit (no shard_map)", False, None), ("EP all_to_all dropless", True, None),
                       ("EP all_to_all cf=1.25", True, 1.25)]:
    cfg = vj.ModelConfig(hidden_size=a.hidden, ffn_size=a.ffn, num_heads=4,
                         num_experts=a.experts, top_k=2, vocab_size=128,
                         moe_capacity_factor=cf)
    graphdef, state, shardings = sh.init_sharded(
        lambda: moe_lib.MoE(cfg, nnx.Rngs(0), expert_parallel=ep), mesh)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (a.tokens // 128, 128, a.hidden)),
                       sh.batch_sharding(mesh, ndim=3))

    def loss(state, x):
      y, aux = nnx.merge(graphdef, state)(x)
      return jnp.mean(y.astype(jnp.float32) ** 2), aux["dropped_tokens"]

    with jax.set_mesh(mesh):
      f = jax.jit(jax.value_and_grad(loss, has_aux=True))
      t = time.perf_counter()
      compiled = f.lower(state, x).compile()
      compile_s = time.perf_counter() - t
      jax.block_until_ready(compiled(state, x))
      times = []
      for _ in range(a.repeats):
        t = time.perf_counter()
        (_, dropped), _ = jax.block_until_ready(compiled(state, x))
        times.append(time.perf_counter() - t)
    kinds = collections.Counter()
    moved = collections.Counter()
    for c in sh.hlo_collectives(compiled.as_text()):
      kinds[c["kind"]] += 1
      moved[c["kind"]] += sum(math.prod(s) for s in c["shapes"]) * 4
    coll = ", ".join(f"{k} x{n} ({moved[k] / 2**20:.1f} MiB)" for k, n in sorted(kinds.items()))
    print(f"{name:24s} {1e3 * min(times):8.1f} ms  compile {compile_s:5.1f} s  "
          f"dropped {int(dropped)}  {coll}")


if __name__ == "__main__":
  main()
