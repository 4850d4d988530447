"""Mixture of Experts: softmax router, top-k, sort-based dispatch, grouped matmuls.

Each token's k expert assignments are sorted by expert so that every expert's rows are
contiguous; grouped matmuls (`vesperjax.model.grouped`: `ragged_dot` on GPU/TPU, padded
row blocks on CPU) then run each expert's FFN on its rows only (no
every-expert-then-mask), and a gather puts the rows back in order. Every expert is the
same GLU FFN with FlyLoRA gate/up projections as the dense layer.

Expert parallelism: when the ambient mesh (`jax.set_mesh`) has an `expert` axis of size
> 1, the layer runs inside `jax.shard_map`. Each device routes its own tokens, packs the
rows for each expert-device into a fixed-size buffer, exchanges them with one
`all_to_all` over `expert`, runs its local experts with grouped matmuls (FFN width split over
`tensor` when present, partial sums psum-ed), and sends the results back with a second
all_to_all. Buffers are sized for the worst case (dropless: tokens * k rows per
destination) or by `moe_capacity_factor`. Without such a mesh nothing changes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from vesperjax.config import ModelConfig
from vesperjax.sharding import ambient_mesh, batch_axes
from vesperjax.sharding import top_k as partitionable_top_k
from vesperjax.model.grouped import GroupLayout
from vesperjax.kernels.era import era_gated
from vesperjax.model.layers import (FrozenProjection, RoutingBias, annotated, balance_step,
                                    param, rank_topk_mask, sparse_random_projection)


def expert_linear(w: dict, x, layout: GroupLayout, config: ModelConfig):
  """FlyLoRA linear of laid-out rows: (out, per-expert rank counts or None).

  Rows in no group (padding) are left out of the counts; their output must be ignored.
  """
  dt = x.dtype
  num = w["kernel"].shape[0]
  kernel = w["kernel"].astype(dt)
  if config.lora_rank:
    y = layout.matmul(x, jax.lax.stop_gradient(w["lora_a"]).astype(dt))
    mask = rank_topk_mask(y, layout.per_row(w["routing_bias"]), config.lora_topk)
    counts = jax.ops.segment_sum(mask.astype(jnp.float32), layout.group, num_segments=num)
    # As FlyLoRALinear: base and adapter as one matmul, [x | s (mask * y)] @ [W; B].
    x = jnp.concatenate([x, (y * mask) * jnp.asarray(config.lora_scale, dt)], axis=-1)
    kernel = jnp.concatenate([kernel, w["lora_b"].astype(dt)], axis=1)
  else:
    counts = None
  return layout.matmul(x, kernel) + layout.per_row(w["bias"].astype(dt)), counts


class ExpertFlyLoRA(nnx.Module):
  """FlyLoRA weights of E experts (applied by `expert_linear` to rows grouped by expert)."""

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

  def weights(self) -> dict:
    names = ("kernel", "bias") + (("lora_a", "lora_b", "routing_bias")
                                  if self.config.lora_rank else ())
    return {n: getattr(self, n)[...] for n in names}

  def balance(self, counts) -> None:
    """Gradient-free rank balancing from this step's per-expert rank counts."""
    if counts is not None and not self.deterministic:
      self.routing_bias[...] += balance_step(counts, self.config.lora_bias_rate)



# Set False to make every MoE fall back to the local path even under an expert mesh
# (XLA then gathers expert weights; used by benchmarks/sharding_moe.py to compare).
EXPERT_PARALLEL = True


def route(x, router, top_k: int):
  """Router probabilities [T, E] (fp32), top-k experts [T, k] and renormalised weights."""
  probs = jax.nn.softmax(
      jnp.dot(x, router.astype(x.dtype), preferred_element_type=jnp.float32), -1)
  top_p, top_e = partitionable_top_k(probs, top_k)
  return probs, top_e, top_p / top_p.sum(-1, keepdims=True)


def capacity(config: ModelConfig, tokens: int) -> int | None:
  """Per-expert row limit for `tokens` local tokens, None when dropless."""
  if config.moe_capacity_factor is None:
    return None
  return max(1, math.ceil(config.moe_capacity_factor * tokens * config.top_k
                          / config.num_experts))


def position_in_expert(flat_e, num_experts: int):
  """(order sorting assignments by expert, expert of each sorted row, position of each
  sorted row among its expert's rows, assignments per expert)."""
  order = jnp.argsort(flat_e, stable=True)
  sorted_e = flat_e[order]
  counts = jnp.bincount(flat_e, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  return order, sorted_e, jnp.arange(flat_e.shape[0]) - starts[sorted_e], counts


def expert_mesh(num_experts: int):
  """The ambient (abstract) mesh when it has an `expert` axis > 1 dividing the experts."""
  mesh = ambient_mesh()
  ep = dict(mesh.shape).get("expert", 1) if mesh is not None else 1
  return mesh if ep > 1 and num_experts % ep == 0 else None


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
    """x: [..., D] -> (same shape, aux).

    aux: "load_balance_loss" [], "expert_load" [E] (share of the T*k assignments routed
    to each expert, before any drop), "dropped_tokens" [] (assignments over capacity).
    """
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    mesh = expert_mesh(self.config.num_experts)
    if EXPERT_PARALLEL and mesh is not None and x.shape[0] % _batch_devices(mesh) == 0:
      y, aux = self._expert_parallel(x, mesh)
    else:
      y, aux = self._local(x)
    return y.reshape(shape), aux

  def _local(self, x):
    """All experts on this device (under plain pjit, XLA gathers the expert weights)."""
    c = self.config
    e, k = c.num_experts, c.top_k
    dt = x.dtype
    tokens = x.shape[0]
    probs, top_e, weights = route(x, self.router[...], k)

    flat_e = top_e.reshape(-1)
    cap = capacity(c, tokens)
    if cap is None:
      order = jnp.argsort(flat_e, stable=True)  # rows grouped by expert
      group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
      routed, dropped = group_sizes, jnp.zeros((), jnp.float32)
    else:  # over-capacity rows get the padding id e: sorted last, in no group
      first, sorted_e, pos, routed = position_in_expert(flat_e, e)
      keep = jnp.zeros_like(pos).at[first].set(pos) < cap
      key = jnp.where(keep, flat_e, e)
      order = jnp.argsort(key, stable=True)
      group_sizes = jnp.bincount(key, length=e + 1)[:e].astype(jnp.int32)
      dropped = (flat_e.shape[0] - keep.sum()).astype(jnp.float32)
    layout = GroupLayout(group_sizes, order.shape[0])
    out, gate_counts, up_counts = _expert_ffn(
        c, layout.to_groups(x[order // k]), layout, self.gate.weights(),
        self.up.weights(), self.down_kernel[...], self.down_bias[...])
    self.gate.balance(gate_counts)
    self.up.balance(up_counts)
    out = layout.from_groups(out)

    unsorted = out[jnp.argsort(order)].reshape(tokens, k, -1)
    y = jnp.einsum("tkd,tk->td", unsorted, weights.astype(dt))

    load = routed.astype(jnp.float32) / (tokens * k)  # f_i: share of assignments
    balance = e * jnp.sum(load * probs.mean(0))  # Switch loss N * sum_i f_i P_i
    return y, {"load_balance_loss": balance, "expert_load": load, "dropped_tokens": dropped}

  def _expert_parallel(self, x, mesh):
    """Tokens split over the batch axes, experts over `expert`: all_to_all dispatch."""
    c = self.config
    sizes = dict(mesh.shape)
    baxes = batch_axes(mesh)
    f = c.ffn_size
    tp = "tensor" if sizes.get("tensor", 1) > 1 and f % sizes["tensor"] == 0 else None
    gate, up = self.gate.weights(), self.up.weights()
    wspec = {"kernel": P("expert", None, tp), "bias": P("expert", tp),
             "lora_a": P("expert"), "lora_b": P("expert", None, tp),
             "routing_bias": P("expert")}
    lin_spec = {n: wspec[n] for n in gate}
    tok = P(baxes)
    counts_spec = P("expert") if c.lora_rank else None
    body = _ep_body(c, sizes["expert"], baxes, tp)
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(tok, P(), lin_spec, lin_spec, P("expert", tp), P("expert")),
        out_specs=(tok, {"load_balance_loss": P(), "expert_load": P(),
                         "dropped_tokens": P()}, counts_spec, counts_spec))
    y, aux, gate_counts, up_counts = fn(x, self.router[...], gate, up,
                                        self.down_kernel[...], self.down_bias[...])
    self.gate.balance(gate_counts)
    self.up.balance(up_counts)
    return y, aux


def _batch_devices(mesh) -> int:
  sizes = dict(mesh.shape)
  return math.prod(sizes[a] for a in batch_axes(mesh))


def _ep_body(c: ModelConfig, ep: int, baxes: tuple[str, ...], tp: str | None):
  """The per-device function of the expert-parallel MoE (closes over static config)."""
  e, k = c.num_experts, c.top_k
  local_e = e // ep
  replica_axes = tuple(a for a in baxes if a != "expert")  # same experts, other tokens

  def body(x, router, gate, up, down_kernel, down_bias):
    dt = x.dtype
    tokens, d = x.shape
    probs, top_e, weights = route(x, router, k)
    flat_e = top_e.reshape(-1)
    order, sorted_e, pos, routed = position_in_expert(flat_e, e)
    cap = capacity(c, tokens)
    n = flat_e.shape[0]
    keep = jnp.ones((n,), bool) if cap is None else pos < cap
    kept = routed if cap is None else jnp.minimum(routed, cap)
    buf = n if cap is None else min(n, local_e * cap)  # rows per destination device

    # Slot of each kept row in its destination's buffer (rows stay sorted by expert).
    dest = sorted_e // local_e
    kept_before = jnp.cumsum(kept) - kept  # kept rows of all lower experts
    slot = jnp.cumsum(keep) - keep - kept_before[dest * local_e]
    index = jnp.where(keep, dest * buf + slot, ep * buf)  # out of range: dropped
    send = jnp.zeros((ep * buf, d), dt).at[index].set(x[order // k], mode="drop")
    send_e = jnp.full((ep * buf,), local_e, jnp.int32).at[index].set(
        sorted_e - dest * local_e, mode="drop")

    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
    out, gate_counts, up_counts = _local_experts(
        c, recv, recv_e, local_e, gate, up, down_kernel, down_bias, tp)
    back = jax.lax.all_to_all(out, "expert", 0, 0, tiled=True)

    rows = jnp.where(keep[:, None], back[jnp.minimum(index, ep * buf - 1)], 0)
    unsorted = rows[jnp.argsort(order)].reshape(tokens, k, d)
    y = jnp.einsum("tkd,tk->td", unsorted, weights.astype(dt))

    total = jax.lax.psum(jnp.float32(tokens), baxes)
    load = jax.lax.psum(routed.astype(jnp.float32), baxes) / (total * k)
    mean_probs = jax.lax.psum(probs.sum(0), baxes) / total
    aux = {"load_balance_loss": e * jnp.sum(load * mean_probs), "expert_load": load,
           "dropped_tokens": jax.lax.psum((n - keep.sum()).astype(jnp.float32), baxes)}
    if c.lora_rank and replica_axes:
      gate_counts = jax.lax.psum(gate_counts, replica_axes)
      up_counts = jax.lax.psum(up_counts, replica_axes)
    return y, aux, gate_counts, up_counts

  return body


def _expert_ffn(c, x, layout: GroupLayout, gate, up, down_kernel, down_bias, tp=None):
  """The experts' GLU FFN on laid-out rows: (out, gate rank counts, up rank counts)."""
  dt = x.dtype
  g, gate_counts = expert_linear(gate, x, layout, c)
  u, up_counts = expert_linear(up, x, layout, c)
  out = layout.matmul(era_gated(g, u, c.era_gamma), down_kernel.astype(dt))
  if tp:
    out = jax.lax.psum(out, tp)  # FFN width was split over `tensor`: sum the halves
  out = out + layout.per_row(down_bias.astype(dt))
  return out, gate_counts, up_counts


def _local_experts(c, rows, expert_ids, local_e, gate, up, down_kernel, down_bias, tp):
  """This device's experts on the rows it received (padding rows: id local_e)."""
  order = jnp.argsort(expert_ids, stable=True)
  sizes = jnp.bincount(expert_ids, length=local_e + 1)[:local_e].astype(jnp.int32)
  layout = GroupLayout(sizes, rows.shape[0])
  out, gate_counts, up_counts = _expert_ffn(c, layout.to_groups(rows[order]), layout,
                                            gate, up, down_kernel, down_bias, tp)
  return layout.from_groups(out)[jnp.argsort(order)], gate_counts, up_counts
