"""Multi-head causal self-attention with split-half RoPE and an optional KV cache."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from vesperjax.config import ModelConfig
from vesperjax.kernels import attention, attention_implementation
from vesperjax.kernels.platform import PER_SHARD_ATTENTION
from vesperjax.model.layers import flat_tokens, param
from vesperjax.sharding import ambient_mesh, batch_axes


class KVCache(NamedTuple):
  """Keys and values of every layer for `max_len` positions; `index` = tokens written."""
  k: jax.Array  # [L, B, max_len, H, Dh]
  v: jax.Array
  index: jax.Array  # int32 [L] (all equal)


class LayerCacheView(NamedTuple):
  """What one layer's attention sees inside the layer scan: the whole stacked cache (a
  scan carry, so writes are in place) and which layer / position to write."""
  k: jax.Array  # [L, B, max_len, H, Dh]
  v: jax.Array
  layer: jax.Array  # int32 scalar
  index: jax.Array  # int32 scalar: position of this call's first token


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotate the two halves of each head (GPT-NeoX "split-half" layout), in fp32.

  x: [B, S, H, Dh]; positions: [B, S] integer positions.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, h, dh = config.hidden_size, config.num_heads, config.head_dim
    self.config = config
    self.qkv_kernel = param(rngs, (d, 3, h, dh), ("embed", None, "heads", "head_dim"),
                            config.init_std)
    self.qkv_bias = param(rngs, (3, h, dh), (None, "heads", "head_dim"), None)
    self.out_kernel = param(rngs, (h, dh, d), ("heads", "head_dim", "embed"),
                            config.init_std)
    self.out_bias = param(rngs, (d,), ("embed",), None)

  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: LayerCacheView | None = None
               ) -> tuple[jax.Array, LayerCacheView | None]:
    dt = x.dtype
    b, s, h, dh = *x.shape[:2], self.config.num_heads, self.config.head_dim
    # Over flattened token rows: each weight gradient then contracts one axis (see
    # `flat_tokens`).
    qkv = jnp.einsum("nd,dthk->nthk", flat_tokens(x), self.qkv_kernel[...].astype(dt))
    qkv = (qkv + self.qkv_bias[...].astype(dt)).reshape(b, s, 3, h, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = rope(q, positions, self.config.rope_theta)
    k = rope(k, positions, self.config.rope_theta)
    if cache is None:
      out = causal_attention(q, k, v, self.config.attention_impl)
    else:
      cache, out = _attend_with_cache(q, k, v, positions, cache)
    y = jnp.einsum("nhk,hkd->nd", out.reshape(b * s, h, dh), self.out_kernel[...].astype(dt))
    return (y + self.out_bias[...].astype(dt)).reshape(x.shape), cache


def causal_attention(q, k, v, implementation):
  """Causal attention of [B, S, H, D] q, k, v. A Mosaic kernel (splash on TPU), which XLA
  cannot partition, runs per shard under the ambient mesh: `jax.shard_map` over the batch
  axes and, where it divides the heads, the tensor axis (attention is independent per
  sequence and per head, so no communication)."""
  impl = attention_implementation(q, k, v, implementation)
  mesh = ambient_mesh()
  if impl not in PER_SHARD_ATTENTION or mesh is None or mesh.size == 1:
    return attention(q, k, v, causal=True, implementation=impl)
  sizes, heads = dict(mesh.shape), q.shape[2]
  tp = "tensor" if sizes.get("tensor", 1) > 1 and heads % sizes["tensor"] == 0 else None
  spec = P(batch_axes(mesh) or None, None, tp, None)
  per_shard = jax.shard_map(
      lambda q, k, v: attention(q, k, v, causal=True, implementation=impl),
      mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
      check_vma=False)  # splash's pallas_call declares no varying mesh axes
  return per_shard(q, k, v)


def _attend_with_cache(q, k, v, positions, cache: LayerCacheView):
  """Write this call's keys/values into the stacked cache in place (only the new
  positions are touched), then attend over this layer's written ones."""
  start = (cache.layer, 0, cache.index, 0, 0)
  k_all = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start)
  v_all = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start)
  k_layer = jax.lax.dynamic_index_in_dim(k_all, cache.layer, keepdims=False)
  v_layer = jax.lax.dynamic_index_in_dim(v_all, cache.layer, keepdims=False)
  key_pos = jnp.arange(k_layer.shape[1])
  mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, S, max_len]
  out = jax.nn.dot_product_attention(q, k_layer.astype(q.dtype), v_layer.astype(q.dtype),
                                     mask=mask[:, None])
  return cache._replace(k=k_all, v=v_all), out
