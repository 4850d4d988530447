"""Mixture of Experts: softmax router, top-k, sort-based dispatch, grouped matmuls.

Each token's k expert assignments are sorted by expert so that every expert's rows are
contiguous; grouped matmuls (`vesperjax.kernels.GroupLayout`, implementation
`config.moe_matmul`: padded row blocks, `jax.lax.ragged_dot` or `tokamax.ragged_dot`;
"auto" picks per target platform) then run each expert's FFN on its rows only, and a
gather puts the rows back in order. Every expert is the
same GLU FFN with FlyLoRA gate/up projections as the dense layer (`layers.flylora_matmul`).

Expert parallelism: when the ambient mesh (`jax.set_mesh`) has an `expert` axis of size
> 1, or axes that split the batch (then every device holds every expert: an expert axis
of 1), the layer runs inside `jax.shard_map`. Each device routes its own tokens, packs the
rows for each expert-device into a fixed-size buffer, exchanges them with one
`all_to_all` over `expert`, runs its local experts with grouped matmuls (FFN width split over
`tensor` when present, partial sums psum-ed), and sends the results back with a second
all_to_all. Buffers are sized for the worst case (dropless: tokens * k rows per
destination) or by `moe_capacity_factor` (a capacity per device). Without such a mesh,
or with `expert_parallel=False`, the layer routes all tokens at once.

Shape suffixes: T tokens (on this device), D hidden size, F FFN width, E experts, K
experts per token, N = T * K assignments, S rows sorted by expert in a grouped-matmul
layout, R FlyLoRA rank, L experts on this device, P devices on the `expert` axis, C
buffer rows per destination device.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from vesperjax.config import ModelConfig
from vesperjax.kernels import GroupLayout, era_gated, partitionable_top_k
from vesperjax.model.layers import (FrozenProjection, RoutingBias, annotated, balance_step,
                                    flylora_matmul, param, sparse_random_projection)
from vesperjax.sharding import ambient_mesh, batch_axes


def expert_linear(w: dict, x_SxD, layout: GroupLayout, config: ModelConfig):
  """FlyLoRA linear of laid-out rows: (out [S, F], per-expert rank counts [E, R] or None).

  Rows in no group (padding) are left out of the counts; their output must be ignored.
  """
  dt = x_SxD.dtype
  bias_SxF = layout.per_row(w["bias"].astype(dt))
  if not config.lora_rank:
    return layout.matmul(x_SxD, w["kernel"].astype(dt)) + bias_SxF, None
  y_SxF, mask_SxR = flylora_matmul(x_SxD, w["kernel"], w["lora_a"], w["lora_b"],
                                   layout.per_row(w["routing_bias"]), config, layout.matmul)
  counts_ExR = jax.ops.segment_sum(mask_SxR.astype(jnp.float32), layout.group,
                                   num_segments=w["kernel"].shape[0])
  return y_SxF + bias_SxF, counts_ExR


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
    """The arrays `expert_linear` takes: kernel [E, D, F], bias [E, F] and, with a LoRA
    rank R, lora_a [E, D, R], lora_b [E, R, F], routing_bias [E, R]."""
    names = ("kernel", "bias") + (("lora_a", "lora_b", "routing_bias")
                                  if self.config.lora_rank else ())
    return {n: getattr(self, n)[...] for n in names}

  def balance(self, counts) -> None:
    """Gradient-free rank balancing from this step's per-expert rank counts."""
    if counts is not None and not self.deterministic:
      self.routing_bias[...] += balance_step(counts, self.config.lora_bias_rate)


def route(x_TxD, router_DxE, top_k: int):
  """Router probabilities [T, E] (fp32), top-k experts [T, K] and renormalised weights
  [T, K]."""
  probs_TxE = jax.nn.softmax(
      jnp.dot(x_TxD, router_DxE.astype(x_TxD.dtype), preferred_element_type=jnp.float32), -1)
  top_p_TxK, top_e_TxK = partitionable_top_k(probs_TxE, top_k)
  return probs_TxE, top_e_TxK, top_p_TxK / top_p_TxK.sum(-1, keepdims=True)


def capacity(config: ModelConfig, tokens: int) -> int | None:
  """Per-expert row limit for `tokens` local tokens, None when dropless."""
  if config.moe_capacity_factor is None:
    return None
  return max(1, math.ceil(config.moe_capacity_factor * tokens * config.top_k
                          / config.num_experts))


def position_in_expert(expert_N, num_experts: int):
  """(order [N] sorting assignments by expert, expert of each sorted row [N], position of
  each sorted row among its expert's rows [N], assignments per expert [E])."""
  order_N = jnp.argsort(expert_N, stable=True)
  sorted_e_N = expert_N[order_N]
  counts_E = jnp.bincount(expert_N, length=num_experts).astype(jnp.int32)
  starts_E = jnp.cumsum(counts_E) - counts_E
  return order_N, sorted_e_N, jnp.arange(expert_N.shape[0]) - starts_E[sorted_e_N], counts_E


def per_shard_mesh(num_experts: int):
  """The ambient (abstract) mesh the layer runs per shard under: one with an `expert`
  axis > 1 dividing the experts, or one that splits the batch (each device then routes
  its own tokens to all the experts; routed globally, XLA would gather every device's
  assignments for the sort, memory growing with the global batch). None otherwise."""
  mesh = ambient_mesh()
  if mesh is None:
    return None
  ep = dict(mesh.shape).get("expert", 1)
  if ep > 1:
    return mesh if num_experts % ep == 0 else None
  return mesh if _batch_devices(mesh) > 1 else None


class MoE(nnx.Module):
  """The MoE FFN layer. `expert_parallel=False` keeps it on the local path even under an
  expert mesh (XLA then gathers the expert weights; `benchmarks/sharding_moe.py` compares
  the two)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, expert_parallel: bool = True):
    d, f, e = config.hidden_size, config.ffn_size, config.num_experts
    self.config = config
    self.expert_parallel = expert_parallel
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
    x_TxD = x.reshape(-1, x.shape[-1])
    mesh = per_shard_mesh(self.config.num_experts)
    if (self.expert_parallel and mesh is not None
        and x_TxD.shape[0] % _batch_devices(mesh) == 0):
      y_TxD, aux = self._expert_parallel(x_TxD, mesh)
    else:
      y_TxD, aux = self._local(x_TxD)
    return y_TxD.reshape(x.shape), aux

  def _local(self, x_TxD):
    """All experts on this device (under plain pjit, XLA gathers the expert weights)."""
    c = self.config
    e, k = c.num_experts, c.top_k
    dt = x_TxD.dtype
    tokens = x_TxD.shape[0]
    probs_TxE, top_e_TxK, weights_TxK = route(x_TxD, self.router[...], k)

    expert_N = top_e_TxK.reshape(-1)
    cap = capacity(c, tokens)
    if cap is None:
      order_N = jnp.argsort(expert_N, stable=True)  # rows grouped by expert
      group_sizes_E = jnp.bincount(expert_N, length=e).astype(jnp.int32)
      routed_E, dropped = group_sizes_E, jnp.zeros((), jnp.float32)
    else:  # over-capacity rows get the padding id e: sorted last, in no group
      first_N, _, pos_N, routed_E = position_in_expert(expert_N, e)
      keep_N = jnp.zeros_like(pos_N).at[first_N].set(pos_N) < cap
      key_N = jnp.where(keep_N, expert_N, e)
      order_N = jnp.argsort(key_N, stable=True)
      group_sizes_E = jnp.bincount(key_N, length=e + 1)[:e].astype(jnp.int32)
      dropped = (expert_N.shape[0] - keep_N.sum()).astype(jnp.float32)
    layout = GroupLayout(group_sizes_E, order_N.shape[0], impl=c.moe_matmul)
    out_SxD, gate_counts, up_counts = _expert_ffn(
        c, layout.to_groups(x_TxD[order_N // k]), layout, self.gate.weights(),
        self.up.weights(), self.down_kernel[...], self.down_bias[...])
    self.gate.balance(gate_counts)
    self.up.balance(up_counts)
    out_NxD = layout.from_groups(out_SxD)

    out_TxKxD = out_NxD[jnp.argsort(order_N)].reshape(tokens, k, -1)
    y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD, weights_TxK.astype(dt))

    load_E = routed_E.astype(jnp.float32) / (tokens * k)  # f_i: share of assignments
    balance = e * jnp.sum(load_E * probs_TxE.mean(0))  # Switch loss N * sum_i f_i P_i
    return y_TxD, {"load_balance_loss": balance, "expert_load": load_E,
                   "dropped_tokens": dropped}

  def _expert_parallel(self, x_TxD, mesh):
    """Tokens split over the batch axes, experts over `expert` (all_to_all dispatch), or
    all experts on every device where the mesh has no expert axis."""
    c = self.config
    sizes = dict(mesh.shape)
    baxes = batch_axes(mesh)
    f = c.ffn_size
    tp = "tensor" if sizes.get("tensor", 1) > 1 and f % sizes["tensor"] == 0 else None
    gate, up = self.gate.weights(), self.up.weights()
    ex = "expert" if sizes.get("expert", 1) > 1 else None  # else every device: all experts
    wspec = {"kernel": P(ex, None, tp), "bias": P(ex, tp), "lora_a": P(ex),
             "lora_b": P(ex, None, tp), "routing_bias": P(ex)}
    lin_spec = {n: wspec[n] for n in gate}
    tok = P(baxes)
    counts_spec = P(ex) if c.lora_rank else None
    body = _ep_body(c, sizes.get("expert", 1), baxes, tp)
    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(tok, P(), lin_spec, lin_spec, P(ex, tp), P(ex)),
        out_specs=(tok, {"load_balance_loss": P(), "expert_load": P(),
                         "dropped_tokens": P()}, counts_spec, counts_spec))
    y_TxD, aux, gate_counts, up_counts = fn(x_TxD, self.router[...], gate, up,
                                            self.down_kernel[...], self.down_bias[...])
    self.gate.balance(gate_counts)
    self.up.balance(up_counts)
    return y_TxD, aux


def _batch_devices(mesh) -> int:
  sizes = dict(mesh.shape)
  return math.prod(sizes[a] for a in batch_axes(mesh))


def _ep_body(c: ModelConfig, ep: int, baxes: tuple[str, ...], tp: str | None):
  """The per-device function of the expert-parallel MoE (closes over static config)."""
  e, k = c.num_experts, c.top_k
  local_e = e // ep
  replica_axes = tuple(a for a in baxes if a != "expert")  # same experts, other tokens
  # rows to their experts' devices and back; one expert device: they are here already
  exchange = ((lambda x: jax.lax.all_to_all(x, "expert", 0, 0, tiled=True)) if ep > 1
              else (lambda x: x))

  def body(x_TxD, router_DxE, gate, up, down_LxFxD, down_bias_LxD):
    dt = x_TxD.dtype
    tokens, d = x_TxD.shape
    probs_TxE, top_e_TxK, weights_TxK = route(x_TxD, router_DxE, k)
    expert_N = top_e_TxK.reshape(-1)
    order_N, sorted_e_N, pos_N, routed_E = position_in_expert(expert_N, e)
    cap = capacity(c, tokens)
    n = expert_N.shape[0]
    keep_N = jnp.ones((n,), bool) if cap is None else pos_N < cap
    kept_E = routed_E if cap is None else jnp.minimum(routed_E, cap)
    buf = n if cap is None else min(n, local_e * cap)  # C: rows per destination device

    # Slot of each kept row in its destination's buffer (rows stay sorted by expert).
    dest_N = sorted_e_N // local_e
    kept_before_E = jnp.cumsum(kept_E) - kept_E  # kept rows of all lower experts
    slot_N = jnp.cumsum(keep_N) - keep_N - kept_before_E[dest_N * local_e]
    index_N = jnp.where(keep_N, dest_N * buf + slot_N, ep * buf)  # out of range: dropped
    send_PCxD = jnp.zeros((ep * buf, d), dt).at[index_N].set(x_TxD[order_N // k],
                                                              mode="drop")
    send_e_PC = jnp.full((ep * buf,), local_e, jnp.int32).at[index_N].set(
        sorted_e_N - dest_N * local_e, mode="drop")

    recv_PCxD, recv_e_PC = exchange(send_PCxD), exchange(send_e_PC)
    out_PCxD, gate_counts, up_counts = _local_experts(
        c, recv_PCxD, recv_e_PC, local_e, gate, up, down_LxFxD, down_bias_LxD, tp)
    back_PCxD = exchange(out_PCxD)

    rows_NxD = jnp.where(keep_N[:, None], back_PCxD[jnp.minimum(index_N, ep * buf - 1)], 0)
    out_TxKxD = rows_NxD[jnp.argsort(order_N)].reshape(tokens, k, d)
    y_TxD = jnp.einsum("tkd,tk->td", out_TxKxD, weights_TxK.astype(dt))

    total = jax.lax.psum(jnp.float32(tokens), baxes)
    load_E = jax.lax.psum(routed_E.astype(jnp.float32), baxes) / (total * k)
    mean_probs_E = jax.lax.psum(probs_TxE.sum(0), baxes) / total
    aux = {"load_balance_loss": e * jnp.sum(load_E * mean_probs_E), "expert_load": load_E,
           "dropped_tokens": jax.lax.psum((n - keep_N.sum()).astype(jnp.float32), baxes)}
    if c.lora_rank and replica_axes:
      gate_counts = jax.lax.psum(gate_counts, replica_axes)
      up_counts = jax.lax.psum(up_counts, replica_axes)
    return y_TxD, aux, gate_counts, up_counts

  return body


def _expert_ffn(c, x_SxD, layout: GroupLayout, gate, up, down_ExFxD, down_bias_ExD, tp=None):
  """The experts' GLU FFN on laid-out rows: (out [S, D], gate rank counts, up rank
  counts)."""
  dt = x_SxD.dtype
  g_SxF, gate_counts = expert_linear(gate, x_SxD, layout, c)
  u_SxF, up_counts = expert_linear(up, x_SxD, layout, c)
  out_SxD = layout.matmul(era_gated(g_SxF, u_SxF, c.era_gamma), down_ExFxD.astype(dt))
  if tp:
    out_SxD = jax.lax.psum(out_SxD, tp)  # FFN width was split over `tensor`: sum the halves
  out_SxD = out_SxD + layout.per_row(down_bias_ExD.astype(dt))
  return out_SxD, gate_counts, up_counts


def _local_experts(c, rows_MxD, expert_M, local_e, gate, up, down_LxFxD, down_bias_LxD, tp):
  """This device's experts on the M = P * C rows it received (padding rows: id local_e)."""
  order_M = jnp.argsort(expert_M, stable=True)
  sizes_L = jnp.bincount(expert_M, length=local_e + 1)[:local_e].astype(jnp.int32)
  layout = GroupLayout(sizes_L, rows_MxD.shape[0], impl=c.moe_matmul)
  out_SxD, gate_counts, up_counts = _expert_ffn(c, layout.to_groups(rows_MxD[order_M]),
                                                layout, gate, up, down_LxFxD,
                                                down_bias_LxD, tp)
  return layout.from_groups(out_SxD)[jnp.argsort(order_M)], gate_counts, up_counts
