"""Top-k that XLA's SPMD partitioner splits along the batch dimensions.

The partitioner does not split TopK along batch dimensions: it all-gathers the whole
operand onto every device. Argmax is a reduction and partitions, so k argmax passes give
the same values and indices as `jax.lax.top_k` (ties to the lower index) without the
gather; meant for small k (the MoE router's top-k experts).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def partitionable_top_k(x_BxN: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` over the last axis as k argmax passes: (values [..., k],
  int32 indices [..., k])."""
  idx = []
  masked = x_BxN
  for _ in range(k):
    i_B = jnp.argmax(masked, axis=-1)
    idx.append(i_B)
    masked = jnp.where(jax.nn.one_hot(i_B, x_BxN.shape[-1], dtype=bool), -jnp.inf, masked)
  idx_BxK = jnp.stack(idx, -1).astype(jnp.int32)
  return jnp.take_along_axis(x_BxN, idx_BxK, -1), idx_BxK
