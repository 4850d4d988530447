"""Building blocks: parameters with logical axes, LayerNorm, ERA, FlyLoRA, the GLU FFN.

Every parameter carries logical axis names (`out_sharding` metadata); `vesperjax.sharding`
maps them to mesh axes, so the model never mentions a mesh.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vesperjax.config import ModelConfig
# era_gated: the GLU's ERA(g) * u on `era_reference` (GELU_tanh + gamma * softplus, in
# fp32, the one definition the fused Pallas kernel `vesperjax.kernels.era` is tested
# against; swap the kernel in once checked on GPU), with a backward keeping only g and u.
from vesperjax.kernels import era_gated, rows_matmul


class FrozenProjection(nnx.Variable):
  """FlyLoRA's fixed sparse random down-projection A: state, never a trainable Param."""


class RoutingBias(nnx.Variable):
  """FlyLoRA's rank load-balancing bias, updated in the forward pass without gradients."""


def annotated(cls: type[nnx.Variable], value: jax.Array, axes) -> nnx.Variable:
  """A variable with logical axis names; placement is left to `vesperjax.sharding`
  (flax's eager sharding would demand a mesh at construction)."""
  return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def param(rngs: nnx.Rngs, shape, axes, std: float | None) -> nnx.Param:
  """An fp32 parameter, normal(std) or zeros (std=None), annotated with logical axes."""
  if std is None:
    value = jnp.zeros(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return annotated(nnx.Param, value, axes)


class LayerNorm(nnx.Module):
  """LayerNorm computed in fp32 whatever the compute dtype, returned in that dtype."""

  def __init__(self, dim: int, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = annotated(nnx.Param, jnp.ones((dim,), jnp.float32), ("norm",))
    self.bias = param(rngs, (dim,), ("norm",), None)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    mean = h.mean(-1, keepdims=True)
    var = jnp.square(h - mean).mean(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(var + self.eps)
    return (h * self.scale[...] + self.bias[...]).astype(x.dtype)


def sparse_random_projection(key: jax.Array, n: int, r: int, nonzeros: int) -> jax.Array:
  """FlyLoRA's A, stored transposed as [n, r]: each of the r ranks reads `nonzeros`
  random inputs with weights drawn from N(0, 1/r^2) (the paper's initialisation)."""
  k_pick, k_val = jax.random.split(key)
  u = jax.random.uniform(k_pick, (r, n))
  kth = jnp.sort(u, axis=1)[:, nonzeros - 1:nonzeros]
  values = jax.random.normal(k_val, (r, n), jnp.float32) / r
  return jnp.where(u <= kth, values, 0.0).T


def rank_topk_mask(y: jax.Array, bias: jax.Array, k: int) -> jax.Array:
  """Keep, per token, the k ranks with the largest |y + bias| (the implicit router).

  A rank is kept when fewer than k ranks beat it (larger score, ties to the lower index):
  the set `lax.top_k` picks, found by one r x r compare-and-count per token instead of k
  argmax passes. It is elementwise work plus a reduction, so it fuses into one loop and
  partitions over the batch (TopK does not).
  """
  score = jnp.abs(y.astype(jnp.float32) + bias)
  r = score.shape[-1]
  mine, other = score[..., :, None], score[..., None, :]
  earlier = jnp.arange(r)[None, :] < jnp.arange(r)[:, None]  # other's index < mine
  beaten_by = (other > mine) | ((other == mine) & earlier)
  return (beaten_by.sum(-1) < k).astype(y.dtype)


def balance_step(counts: jax.Array, rate: float) -> jax.Array:
  """Bias change that steers future tokens toward under-used ranks (sign of the gap)."""
  return rate * jnp.sign(counts.mean(-1, keepdims=True) - counts)


def flat_tokens(x: jax.Array) -> jax.Array:
  """[..., d] -> [tokens, d]: matmuls over flattened rows, not [batch, seq, d] ones.

  The weight gradient of `[B, S, d] @ [d, n]` contracts two axes; XLA:CPU lowers that by
  transposing the [B, S, n] cotangent and running a slower matmul (docs/benchmarks.md,
  `benchmarks/cpu_matmul_forms.py`).
  """
  return x.reshape(-1, x.shape[-1])


def flylora_matmul(x_NxD: jax.Array, kernel: jax.Array, lora_a: jax.Array,
                   lora_b: jax.Array, routing_bias: jax.Array, config: ModelConfig,
                   matmul=jnp.matmul) -> tuple[jax.Array, jax.Array]:
  """FlyLoRA without its bias: (x W + s B (mask * A x) [N, F], rank mask [N, R]).

  The dense layer passes W [D, F], A [D, R], B [R, F] and `jnp.matmul`; the experts
  pass [E, ...] weights and their layout's grouped matmul. `routing_bias` is [R] or one
  per row [N, R]; A is frozen (no gradient). The mask keeps each row's `lora_topk` ranks
  with the largest |A x + routing_bias|.
  """
  dt = x_NxD.dtype
  y_NxR = matmul(x_NxD, jax.lax.stop_gradient(lora_a).astype(dt))
  mask_NxR = rank_topk_mask(y_NxR, routing_bias, config.lora_topk)
  adapter_in_NxR = (y_NxR * mask_NxR) * jnp.asarray(config.lora_scale, dt)
  # Base and adapter as one matmul, [x | s (mask * y)] @ [W; B]: one weight-gradient dot
  # over the [N, F] cotangent then serves W and B.
  joint_in = jnp.concatenate([x_NxD, adapter_in_NxR], axis=-1)
  joint_kernel = jnp.concatenate([kernel.astype(dt), lora_b.astype(dt)], axis=-2)
  return matmul(joint_in, joint_kernel), mask_NxR


class FlyLoRALinear(nnx.Module):
  """y = x W + b + (alpha / r) * B (topk_mask(A x) * A x), A frozen sparse random.

  With `lora_rank == 0` this is a plain linear layer.
  """

  def __init__(self, d_in: int, d_out: int, config: ModelConfig, rngs: nnx.Rngs,
               axes=("embed", "mlp")):
    self.config = config
    self.deterministic = False  # nnx's .eval() sets True: routing bias stays put
    self.kernel = param(rngs, (d_in, d_out), axes, config.init_std)
    self.bias = param(rngs, (d_out,), axes[1:], None)
    if config.lora_rank:
      r = config.lora_rank
      self.lora_a = annotated(
          FrozenProjection,
          sparse_random_projection(rngs.params(), d_in, r, config.lora_nonzeros_per_row),
          (axes[0], None))
      self.lora_b = param(rngs, (r, d_out), (None, axes[1]), None)
      self.routing_bias = annotated(RoutingBias, jnp.zeros((r,), jnp.float32), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.tokens(flat_tokens(x)).reshape(*x.shape[:-1], -1)

  def tokens(self, x_NxD: jax.Array) -> jax.Array:
    """The layer on [tokens, d_in] rows (see `flat_tokens`)."""
    dt = x_NxD.dtype
    bias = self.bias[...].astype(dt)
    if not self.config.lora_rank:
      return x_NxD @ self.kernel[...].astype(dt) + bias
    y_NxF, mask_NxR = flylora_matmul(x_NxD, self.kernel[...], self.lora_a[...],
                                     self.lora_b[...], self.routing_bias[...], self.config)
    if not self.deterministic:
      counts = mask_NxR.astype(jnp.float32).sum(0)
      self.routing_bias[...] += balance_step(counts, self.config.lora_bias_rate)
    return y_NxF + bias


class FeedForward(nnx.Module):
  """GLU FFN: down(ERA(gate(x)) * up(x)); gate and up are FlyLoRA linears."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.ffn_size
    self.gamma = config.era_gamma
    self.gate = FlyLoRALinear(d, f, config, rngs)
    self.up = FlyLoRALinear(d, f, config, rngs)
    self.down_kernel = param(rngs, (f, d), ("mlp", "embed"), config.init_std)
    self.down_bias = param(rngs, (d,), ("embed",), None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
    rows = flat_tokens(x)
    h = era_gated(self.gate.tokens(rows), self.up.tokens(rows), self.gamma)
    dt = x.dtype
    y = rows_matmul(h, self.down_kernel[...].astype(dt)) + self.down_bias[...].astype(dt)
    return y.reshape(x.shape), {}
