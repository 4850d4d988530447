"""VesperLM: tied embedding -> N pre-norm blocks (scanned) -> LayerNorm -> tied LM head."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vesperjax.config import ModelConfig
from vesperjax.model.attention import Attention, KVCache, LayerCacheView
from vesperjax.model.layers import FeedForward, LayerNorm, RoutingBias, param
from vesperjax.model.meta_head import MetaHead
from vesperjax.model.moe import MoE
from vesperjax.sharding import constrain

# Hidden states stay split over the batch axes under a mesh (a no-op without one): left
# alone, XLA may shard them like the FSDP weights and all-gather the batch every layer.
BATCH_ACTIVATION = ("batch", None, None)

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def unrolled_scan(f, carry, xs):
  """`jax.lax.scan(f, carry, xs)` as a Python loop over the leading axis of xs.

  Each step becomes its own ops, so autodiff keeps every layer's residuals as separate
  buffers: a scan stacks them into [layers, ...] buffers (zero-filled, then written one
  slice per step) and serialises the steps, which slows the tiny train step on CPU
  (docs/benchmarks.md).
  """
  ys = []
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    carry, y = f(carry, jax.tree.map(lambda a: a[i], xs))
    ys.append(y)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


class Block(nnx.Module):
  """x + Attn(LN(x)), then x + FFN-or-MoE(LN(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs, *, expert_parallel: bool = True):
    self.attn_norm = LayerNorm(config.hidden_size, config.norm_eps, rngs)
    self.attn = Attention(config, rngs)
    self.ffn_norm = LayerNorm(config.hidden_size, config.norm_eps, rngs)
    self.ffn = (MoE(config, rngs, expert_parallel=expert_parallel) if config.is_moe
                else FeedForward(config, rngs))

  def __call__(self, x, positions, cache=None):
    x = constrain(x, BATCH_ACTIVATION)
    h, cache = self.attn(self.attn_norm(x), positions, cache)
    x = x + h
    h, aux = self.ffn(self.ffn_norm(x))
    return constrain(x + h, BATCH_ACTIVATION), aux, cache


class VesperLM(nnx.Module):
  """The language model. `model(tokens)` -> (logits [B, S, V] fp32, aux dict).

  The layer stack is one Block with a leading `layers` axis on every variable, run by
  `jax.lax.scan`, so compile time does not grow with depth (`config.scan_layers=False`
  loops over the same stack in Python instead); `config.remat` wraps each layer in
  `jax.checkpoint`. aux is empty for dense models; for MoE it holds the mean
  Switch load-balancing loss over layers, the per-layer expert load [L, E] and the
  number of expert assignments dropped over capacity (0 when dropless).
  `expert_parallel=False` keeps the MoE layers off their expert-parallel path (`MoE`).
  """

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, expert_parallel: bool = True):
    self.config = config
    self.embed = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                       config.init_std)

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(config, rngs, expert_parallel=expert_parallel)

    self.blocks = make_blocks(rngs)
    self.final_norm = LayerNorm(config.hidden_size, config.norm_eps, rngs)
    if config.meta_head:  # absent otherwise: checkpoints without it keep their tree
      self.meta_head = MetaHead(config, rngs)

  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, dict]:
    hidden, aux, _ = self.hidden_states(tokens)
    return self.logits(hidden), aux

  def hidden_states(self, tokens, positions=None, cache: KVCache | None = None):
    """Final-norm hidden states [B, S, D] (compute dtype), aux, and the updated cache.

    With a cache (stacked over layers, see `init_cache`), `tokens` are written at
    `cache.index` onward and attend to everything already in the cache.
    """
    c = self.config
    dt = c.compute_dtype()
    if positions is None:
      start = 0 if cache is None else cache.index[0]
      positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)

    graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
    # the stacked cache rides in the scan carry so each layer writes only its new
    # positions in place (as scan inputs/outputs it would be copied whole every call)
    kv = None if cache is None else (cache.k, cache.v)
    start = None if cache is None else cache.index[0]

    def layer(carry, xs):
      x, kv = carry
      layer_params, layer_rest, i = xs
      block = nnx.merge(graphdef, layer_params, layer_rest)
      view = None if kv is None else LayerCacheView(kv[0], kv[1], i, start)
      x, aux, view = block(x, positions, view)
      kv = None if view is None else (view.k, view.v)
      return (x, kv), (aux, nnx.state(block, RoutingBias))

    # Decoding always scans: the stacked cache then updates in place in the carry
    # (unrolled decoding is slower and compiles longer: docs/benchmarks.md).
    scanned = c.scan_layers or cache is not None
    run_layers = jax.lax.scan if scanned else unrolled_scan
    if c.remat != "none":
      # scan already keeps XLA from merging the recomputation back into the forward;
      # unrolled layers need prevent_cse, or the remat is optimised away
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[c.remat], prevent_cse=not scanned)
    layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
    (x, kv), (aux, routing) = run_layers(layer, (x, kv), (params, rest, layer_ids))
    nnx.update(self.blocks, routing)
    if cache is not None:
      cache = KVCache(kv[0], kv[1], cache.index + tokens.shape[1])
    if aux:  # per-layer values -> the model's: mean balance loss, total drops
      aux = {"load_balance_loss": aux["load_balance_loss"].mean(),
             "expert_load": aux["expert_load"],
             "dropped_tokens": aux["dropped_tokens"].sum()}
    return self.final_norm(x), aux, cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Tied LM head in the compute dtype, accumulated and returned in fp32."""
    w = self.embed[...].astype(hidden.dtype)
    logits = jnp.einsum("bsd,vd->bsv", hidden, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))

  def meta_logits(self, hidden: jax.Array, top1_logprob: jax.Array,
                  entropy: jax.Array) -> jax.Array:
    """The metacognition head's event logits [..., 2] (`config.meta_head`): see
    `vesperjax.model.meta_head`. The logit statistics never carry gradient; the hidden
    states do only with `config.meta_trunk_grad`."""
    if not self.config.meta_trunk_grad:
      hidden = jax.lax.stop_gradient(hidden)
    return self.meta_head(hidden, jax.lax.stop_gradient(top1_logprob),
                          jax.lax.stop_gradient(entropy))

  def init_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
    """An empty KV cache for all layers: arrays [L, B, max_len, H, Dh]."""
    c = self.config
    max_len = max_len or c.max_seq_len
    shape = (c.num_layers, batch_size, max_len, c.num_heads, c.head_dim)
    zeros = jnp.zeros(shape, c.compute_dtype())
    return KVCache(zeros, zeros, jnp.zeros((c.num_layers,), jnp.int32))


def abstract_model(config: ModelConfig) -> VesperLM:
  """`VesperLM(config)` as shapes and shardings only (nothing allocated)."""
  return nnx.eval_shape(lambda: VesperLM(config, rngs=nnx.Rngs(0)))


def trainable_filter(config: ModelConfig):
  """The nnx filter of what trains: every Param, or with freeze_base only FlyLoRA's B
  (and the metacognition head, which has no base to keep)."""
  if config.freeze_base:
    if config.meta_head:
      return nnx.All(nnx.Param, nnx.Any(nnx.PathContains("lora_b"),
                                        nnx.PathContains("meta_head")))
    return nnx.All(nnx.Param, nnx.PathContains("lora_b"))
  return nnx.Param
