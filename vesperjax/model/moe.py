"""Mixture of Experts: softmax router, top-k, sort-based dropless dispatch, grouped matmuls.

Each token's k expert assignments are sorted by expert so that every expert's rows are
contiguous; `jax.lax.ragged_dot` then runs each expert's FFN on exactly its rows (no
every-expert-then-mask, no dropped tokens), and a gather puts the rows back in order.
Every expert is the same GLU FFN with FlyLoRA gate/up projections as the dense layer.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vesperjax.config import ModelConfig
from vesperjax.model.layers import (FrozenProjection, RoutingBias, annotated, balance_step,
                                    era, param, rank_topk_mask, sparse_random_projection)


class ExpertFlyLoRA(nnx.Module):
  """FlyLoRA linear for E experts at once; rows arrive grouped by expert."""

  def __init__(self, d_in: int, d_out: int, config: ModelConfig, rngs: nnx.Rngs):
    e, r = config.num_experts, config.lora_rank
    self.config = config
    self.deterministic = False
    self.kernel = param(rngs, (e, d_in, d_out), ("expert", "embed", "mlp"), config.init_std)
    self.bias = param(rngs, (e, d_out), ("expert", "mlp"), None)
    if r:
      keys = jax.random.split(rngs.params(), e)
      make = lambda k: sparse_random_projection(k, d_in, r, config.lora_nonzeros_per_row)
      self.lora_a = annotated(FrozenProjection, jax.vmap(make)(keys),
                              ("expert", "embed", None))
      self.lora_b = param(rngs, (e, r, d_out), ("expert", None, "mlp"), None)
      self.routing_bias = annotated(RoutingBias, jnp.zeros((e, r), jnp.float32),
                                    ("expert", None))

  def __call__(self, x, expert_of_row, group_sizes):
    dt = x.dtype
    out = jax.lax.ragged_dot(x, self.kernel[...].astype(dt), group_sizes)
    out = out + self.bias[...].astype(dt)[expert_of_row]
    if not self.config.lora_rank:
      return out
    a = jax.lax.stop_gradient(self.lora_a[...]).astype(dt)
    y = jax.lax.ragged_dot(x, a, group_sizes)
    bias = self.routing_bias[...]
    mask = rank_topk_mask(y, bias[expert_of_row], self.config.lora_topk)
    if not self.deterministic:
      counts = jax.ops.segment_sum(mask.astype(jnp.float32), expert_of_row,
                                   num_segments=bias.shape[0])
      self.routing_bias[...] += balance_step(counts, self.config.lora_bias_rate)
    lora = jax.lax.ragged_dot(y * mask, self.lora_b[...].astype(dt), group_sizes)
    return out + jnp.asarray(self.config.lora_scale, dt) * lora


class MoE(nnx.Module):

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, f, e = config.hidden_size, config.ffn_size, config.num_experts
    self.config = config
    self.router = param(rngs, (d, e), ("embed", None), config.init_std)
    self.gate = ExpertFlyLoRA(d, f, config, rngs)
    self.up = ExpertFlyLoRA(d, f, config, rngs)
    self.down_kernel = param(rngs, (e, f, d), ("expert", "mlp", "embed"), config.init_std)
    self.down_bias = param(rngs, (e, d), ("expert", "embed"), None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    """x: [..., D] -> (same shape, {"load_balance_loss": [], "expert_load": [E]})."""
    c = self.config
    e, k = c.num_experts, c.top_k
    shape, dt = x.shape, x.dtype
    x = x.reshape(-1, shape[-1])
    tokens = x.shape[0]

    probs = jax.nn.softmax(
        jnp.dot(x, self.router[...].astype(dt), preferred_element_type=jnp.float32), -1)
    top_p, top_e = jax.lax.top_k(probs, k)  # [T, k]
    weights = top_p / top_p.sum(-1, keepdims=True)

    flat_e = top_e.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)  # rows grouped by expert
    expert_of_row = flat_e[order]
    group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
    rows = x[order // k]

    h = era(self.gate(rows, expert_of_row, group_sizes), c.era_gamma)
    h = h * self.up(rows, expert_of_row, group_sizes)
    out = jax.lax.ragged_dot(h, self.down_kernel[...].astype(dt), group_sizes)
    out = out + self.down_bias[...].astype(dt)[expert_of_row]

    unsorted = out[jnp.argsort(order)].reshape(tokens, k, -1)
    y = jnp.einsum("tkd,tk->td", unsorted, weights.astype(dt))

    load = group_sizes.astype(jnp.float32) / (tokens * k)  # f_i: share of assignments
    balance = e * jnp.sum(load * probs.mean(0))  # Switch loss N * sum_i f_i P_i
    return y.reshape(shape), {"load_balance_loss": balance, "expert_load": load}
