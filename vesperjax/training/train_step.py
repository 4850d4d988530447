"""The jit-compiled train and eval steps over a pure `TrainState` pytree.

One step = `grad_accum` micro-batches scanned on device, one optimizer update. The mean
token cross-entropy and the mean predictive entropy are computed in-graph and handed to
Velvet as extra args; a step whose loss, gradient or update is not finite leaves params,
optimizer state and model state untouched and is counted in `skipped`. Nothing syncs with
the host.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from vesperjax.training import calibration
from vesperjax.config import ModelConfig
from vesperjax.model import VesperLM, abstract_model, trainable_filter
from vesperjax.model.meta_head import meta_loss, meta_probs, meta_targets
from vesperjax.optim import global_norm, velvet_stats
from vesperjax.optim.field import eval_params, make_optimizer

if TYPE_CHECKING:
  from vesperjax.run_config import OptimConfig


class TrainState(struct.PyTreeNode):
  step: jax.Array  # int32: optimizer steps attempted (skipped ones included)
  params: Any  # nnx.State of the trainable Params
  rest: Any  # every other model variable (frozen FlyLoRA A, routing biases, ...)
  opt_state: Any
  rng: jax.Array  # uint32 key data, split once per step
  skipped: jax.Array  # int32: non-finite steps skipped


def init_state_fn(config: ModelConfig, tx: optax.GradientTransformation):
  """(graphdef, init(rng_key) -> TrainState); jit `init` to build the state in place."""
  filt = trainable_filter(config)
  graphdef = nnx.split(abstract_model(config), filt, ...)[0]

  def init(key: jax.Array) -> TrainState:
    init_key, state_key = jax.random.split(key)
    model = VesperLM(config, rngs=nnx.Rngs(init_key))
    _, params, rest = nnx.split(model, filt, ...)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                      opt_state=tx.init(params), rng=jax.random.key_data(state_key),
                      skipped=jnp.zeros((), jnp.int32))

  return graphdef, init


class TokenOutputs(NamedTuple):
  """Per-token outputs of next-token prediction over [B*S] flattened positions."""
  loss: jax.Array  # cross-entropy (nats)
  entropy: jax.Array  # predictive entropy (nats)
  top1_logprob: jax.Array  # log-probability of the top-1 guess (no gradient)
  hidden: jax.Array  # final-norm hidden states [B*S, D]
  aux: dict  # the model's aux (MoE)


def token_outputs(model: VesperLM, tokens: jax.Array, valid_vocab: int,
                  fused: bool) -> TokenOutputs:
  """`TokenOutputs` of tokens [B, S+1]. Logits of ids >= valid_vocab (vocab padding)
  are masked out. Fused, the top-1 log-probability comes from the chunked loss's
  running max: the fp32 logits are never materialised."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  hidden, aux, _ = model.hidden_states(inputs)
  flat = hidden.reshape(-1, hidden.shape[-1])
  if fused:
    from vesperjax.kernels import linear_cross_entropy
    w = model.embed[...].astype(hidden.dtype)
    loss, entropy, top1 = linear_cross_entropy(flat, w, targets.reshape(-1),
                                               valid_vocab=valid_vocab, return_top1=True)
  else:
    logits = model.logits(hidden).reshape(-1, model.config.vocab_size)
    logits = jnp.where(jnp.arange(logits.shape[-1]) < valid_vocab, logits, -jnp.inf)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, targets.reshape(-1, 1), -1)[:, 0]
    entropy = -jnp.sum(jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0.0), -1)
    top1 = jax.lax.stop_gradient(logp.max(-1))
  return TokenOutputs(loss, entropy, top1, flat, aux)


def token_losses(model: VesperLM, tokens: jax.Array, valid_vocab: int, fused: bool):
  """Per-token cross-entropy and predictive entropy (nats) of next-token prediction,
  and the model's aux (`token_outputs`)."""
  out = token_outputs(model, tokens, valid_vocab, fused)
  return out.loss, out.entropy, out.aux


def meta_outputs(model: VesperLM, out: TokenOutputs, tokens: jax.Array, eod_id: int):
  """The metacognition head's event logits [B*S, 2] and its 0/1 targets (correct, end)."""
  correct, end = meta_targets(out.loss, out.top1_logprob, tokens[:, 1:].reshape(-1),
                              eod_id)
  return model.meta_logits(out.hidden, out.top1_logprob, out.entropy), correct, end


def make_train_step(graphdef, config: ModelConfig, tx, *, valid_vocab: int,
                    fused_loss: bool = True, eod_id: int = -1) -> Callable:
  """train_step(state, batch [grad_accum, B, S+1] int32) -> (state, metrics).

  `eod_id`: the tokenizer's end-of-document id, the metacognition head's "end" target
  (config.meta_head; < 0: the event never occurs)."""
  filt = trainable_filter(config)

  def loss_fn(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest, copy=True)
    out = token_outputs(model, tokens, valid_vocab, fused_loss)
    loss, entropy, aux = out.loss, out.entropy, out.aux
    ce = loss.mean()
    total = ce
    if aux:
      total = total + config.moe_aux_weight * aux["load_balance_loss"]
    meta = {}
    if config.meta_head:
      meta = meta_loss(*meta_outputs(model, out, tokens, eod_id))
      total = total + config.meta_weight * meta["meta_loss"]
    new_rest = nnx.state(model, nnx.Not(filt))
    return total, (ce, jax.lax.stop_gradient(entropy.mean()), aux,
                   jax.lax.stop_gradient(meta), new_rest)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: jax.Array):
    def micro(carry, tokens):
      grads_sum, rest = carry
      (_, (ce, entropy, aux, meta, rest)), grads = grad_fn(state.params, rest, tokens)
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, rest), (ce, entropy, aux, meta)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, rest), (ce, entropy, aux, meta) = jax.lax.scan(micro, (zeros, state.rest),
                                                           batch)
    grads = jax.tree.map(lambda g: g / batch.shape[0], grads)
    loss, entropy = ce.mean(), entropy.mean()

    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   loss=loss, entropy=entropy)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    # the update too: a finite gradient can still make a non-finite update (lr=inf, eps=0
    # on a zero gradient); the new moments are finite whenever the gradient is
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(global_norm(updates)))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params),
        rest=keep(rest, state.rest), opt_state=keep(opt_state, state.opt_state),
        rng=rng, skipped=state.skipped + (~finite).astype(jnp.int32))

    metrics = {"loss": loss, "entropy": entropy, "grad_norm": grad_norm,
               "finite": finite, "skipped": new_state.skipped}
    metrics.update({k: v for k, v in velvet_stats(opt_state).items() if k != "grad_norm"})
    if aux:
      metrics["moe_balance_loss"] = aux["load_balance_loss"].mean()
      metrics["expert_load"] = aux["expert_load"].mean(0)  # [L, E]
      metrics["moe_dropped_tokens"] = aux["dropped_tokens"].sum()
    metrics.update({k: v.mean() for k, v in meta.items()})  # over micro-batches
    return new_state, metrics

  return train_step


def make_eval_step(graphdef, *, valid_vocab: int, fused_loss: bool = True) -> Callable:
  """eval_step(state, tokens [B, S+1]) -> summed token loss, token count (no state change)."""
  def eval_step(state: TrainState, tokens: jax.Array):
    model = nnx.merge(graphdef, eval_params(state.opt_state, state.params), state.rest,
                      copy=True)
    model.eval()
    loss, _, _ = token_losses(model, tokens, valid_vocab, fused_loss)
    return loss.sum(), jnp.asarray(loss.size, jnp.float32)

  return eval_step


def make_calibrated_eval_step(graphdef, *, valid_vocab: int, fused_loss: bool = True,
                              eod_id: int = -1) -> Callable:
  """eval_step's outputs and a third: {"meta", "softmax", "end"} `calibration.binned_stats`
  of the head's P(correct) and of the max-softmax probability against top-1
  correctness, and of the head's P(end) against the end-of-document event."""
  def eval_step(state: TrainState, tokens: jax.Array):
    model = nnx.merge(graphdef, eval_params(state.opt_state, state.params), state.rest,
                      copy=True)
    model.eval()
    out = token_outputs(model, tokens, valid_vocab, fused_loss)
    meta_logits, correct, end = meta_outputs(model, out, tokens, eod_id)
    p_correct, p_end = meta_probs(meta_logits)
    stats = {"meta": calibration.binned_stats(p_correct, correct),
             "softmax": calibration.binned_stats(jnp.exp(out.top1_logprob), correct),
             "end": calibration.binned_stats(p_end, end)}
    return out.loss.sum(), jnp.asarray(out.loss.size, jnp.float32), stats

  return eval_step


class ShardedSteps(NamedTuple):
  """Everything device-side a run needs, jit-compiled for one mesh."""
  graphdef: Any
  tx: optax.GradientTransformationExtraArgs
  platform: str  # the target platform the steps are traced for (kernels.platform)
  abstract: Any  # TrainState of ShapeDtypeStructs carrying their shardings (for restore)
  state_sharding: Any
  batch_sharding: Any  # [grad_accum, B, S+1] train batches
  eval_sharding: Any  # [B, S+1] eval batches
  init: Callable  # rng key -> TrainState, built directly on its shardings
  train_step: Callable  # (state, batch) -> (state, metrics); donates state
  eval_step: Callable  # (state, tokens) -> (summed loss, token count)
  # with config.meta_head: (state, tokens) -> (summed loss, token count, calibration
  # sums); see make_calibrated_eval_step. None without the head.
  eval_calibration: Callable | None = None


def sharded_steps(config: ModelConfig, mesh, *, optim: OptimConfig, max_steps: int,
                  valid_vocab: int, fused_loss: bool = True,
                  platform: str = "auto", eod_id: int = -1) -> ShardedSteps:
  """Optimizer, state shardings from the logical-axis rules, and the jitted steps.

  `optim` and `max_steps` (`config.optim`, `config.train.max_steps`) make the optimizer
  and its schedule; `valid_vocab`: the tokenizer's size (Velvet's ln V; logits beyond it
  are masked); `fused_loss`: the chunked linear cross-entropy; `platform`: the backend
  the steps are traced for (`config.train.platform`; "auto": VESPERJAX_PLATFORM, else
  the mesh's devices); `eod_id`: the tokenizer's end-of-document id (the
  metacognition head's "end" target).
  """
  from vesperjax import sharding
  from vesperjax.kernels import platform as platforms
  target = platforms.resolve(platform, mesh.devices.flat)
  param_sh = None
  if optim.name == "velvet" and optim.fused and mesh.size > 1:
    # the fused kernel runs per shard, so the optimizer needs the params' shardings
    # (the same as state_sh.params below, which needs the optimizer to be computed)
    param_sh = sharding.state_shardings(
        nnx.split(abstract_model(config), trainable_filter(config), ...)[1], mesh)
  tx = make_optimizer(optim, max_steps, valid_vocab, param_shardings=param_sh)
  graphdef, init = init_state_fn(config, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract, mesh)
  batch_sh = sharding.batch_sharding(mesh, leading=1)
  eval_sh = sharding.batch_sharding(mesh)
  train_fn = make_train_step(graphdef, config, tx, valid_vocab=valid_vocab,
                             fused_loss=fused_loss, eod_id=eod_id)
  eval_fn = make_eval_step(graphdef, valid_vocab=valid_vocab, fused_loss=fused_loss)
  # every backend choice made while tracing follows the target, not the host's backend
  init, train_fn, eval_fn = (platforms.traced_for(target, f)
                             for f in (init, train_fn, eval_fn))
  calibrated = None
  if config.meta_head:
    calibrated = jax.jit(platforms.traced_for(target, make_calibrated_eval_step(
        graphdef, valid_vocab=valid_vocab, fused_loss=fused_loss, eod_id=eod_id)),
        in_shardings=(state_sh, eval_sh))
  return ShardedSteps(
      graphdef=graphdef, tx=tx, platform=target,
      abstract=jax.tree.map(  # restore targets: Orbax reshards onto this mesh
          lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh),
      state_sharding=state_sh, batch_sharding=batch_sh, eval_sharding=eval_sh,
      init=jax.jit(init, out_shardings=state_sh),
      train_step=jax.jit(train_fn, donate_argnums=(0,), in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, None)),
      eval_step=jax.jit(eval_fn, in_shardings=(state_sh, eval_sh)),
      eval_calibration=calibrated)


def all_finite(tree) -> jax.Array:
  """True when every floating leaf is finite: guards checkpoints against NaN states."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x active matmul params + causal attention scores."""
  d, f, L = config.hidden_size, config.ffn_size, config.num_layers
  ffn = 3 * d * f + 2 * config.lora_rank * f + 2 * d * config.lora_rank
  if config.is_moe:
    ffn = config.top_k * ffn + d * config.num_experts
  matmul = L * (4 * d * d + ffn) + config.vocab_size * d  # + tied LM head
  attention = L * 2 * seq_len * d  # QK^T and AV, causal half of 2 * 2 * S * d
  return 6.0 * matmul + 3.0 * attention
