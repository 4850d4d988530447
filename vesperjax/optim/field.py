"""The trainer's optimizers (`config.optim.name`): Velvet and the optax optimizers a JAX
user would pick instead, each behind the same global-norm clipping and LR schedule.

  velvet               `velvet.velvet`, fed the step's loss and entropy (`optim.velvet_rules`)
  adamw                `optax.adamw`
  muon                 `optax.contrib.muon` on the 2-D hidden weights (attention, FFN and
                       FlyLoRA B matrices; Q, K and V each a matrix of its own), AdamW on
                       the embeddings / tied head, norms, biases, MoE router and meta head,
                       as Muon's authors advise; `consistent_rms=0.2` scales Muon's update
                       to AdamW's RMS, so one peak LR serves both (Liu et al. 2025,
                       arXiv:2502.16982)
  schedule_free_adamw  `optax.contrib.schedule_free_adamw` at a constant LR after the
                       warmup (it replaces the schedule); evaluated on
                       `schedule_free_eval_params` (`eval_params`)
  ademamix             `optax.contrib.ademamix` with the paper's warmups of alpha and b3
                       over the whole run (Pagliardini et al. 2024, arXiv:2409.03137)

`optim.entropy_lr=True` puts Velvet's entropy rule after any of the others, as an LR
multiplier (`scale_by_velvet_learning_rate(1.0, flip_sign=False)`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from vesperjax.optim.clipping import clip_by_global_norm_with_stats
from vesperjax.optim.velvet import velvet
from vesperjax.optim.velvet_split import scale_by_velvet_learning_rate
from vesperjax.run_config import OPTIMIZERS

if TYPE_CHECKING:
  from vesperjax.run_config import OptimConfig
MUON_CONSISTENT_RMS = 0.2
ADEMAMIX_B3, ADEMAMIX_ALPHA = 0.9999, 5.0
# Muon's matrices by parameter name: (reduction axes, output axes), counted from the end;
# leading axes (layers, experts, q/k/v) are batch axes: each slice is one matrix.
_MUON_AXES = {"qkv_kernel": ((-4,), (-2, -1)), "out_kernel": ((-3, -2), (-1,)),
              "kernel": ((-2,), (-1,)), "down_kernel": ((-2,), (-1,)),
              "lora_b": ((-2,), (-1,))}
_ADAM_ONLY = ("embed", "router", "meta")


def warmup_steps(optim: OptimConfig, max_steps: int) -> int:
  """The warmup a run of `max_steps` uses: optim.warmup_steps, at most max_steps - 1 (the
  peak LR is reached before the last step, and the cosine has a step to decay over)."""
  return min(optim.warmup_steps, max(max_steps - 1, 0))


def adjusted_values(optim: OptimConfig, max_steps: int) -> list[str]:
  """One line per `optim` value that a run of `max_steps` uses other than given (for a
  `warning:` line: the key, the value given and the value used)."""
  used = warmup_steps(optim, max_steps)
  if used == optim.warmup_steps:
    return []
  return [f"config.optim.warmup_steps={optim.warmup_steps} is not below the run's "
          f"{max_steps} steps: using {used} (the warmup must end before the last step)"]


def lr_schedule(optim: OptimConfig, max_steps: int) -> optax.Schedule:
  """Linear warmup to optim.lr (`warmup_steps`), cosine decay to lr * min_lr_ratio at
  max_steps."""
  warmup = warmup_steps(optim, max_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(max_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def muon_dimension_numbers(params: Any) -> Any:
  """A tree like params: `MuonDimensionNumbers` for Muon's matrices, None for AdamW's."""
  def dims(path, x):
    names = _names(path)
    leaf = next((n for n in reversed(names) if n != "value"), "")
    if any(a in n for n in names for a in _ADAM_ONLY) or leaf not in _MUON_AXES:
      return None
    reduction, output = _MUON_AXES[leaf]
    if x.ndim < len(reduction) + len(output):
      return None
    return contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)
  return jax.tree_util.tree_map_with_path(dims, params)


def ademamix_b3_schedule(b3: float, b_start: float, steps: int) -> optax.Schedule:
  """The paper's b3 warmup: from b_start (= b1) to b3 over `steps`, linear in the
  momentum horizon's log (Pagliardini et al. 2024, section 3)."""
  log_start, log_end = math.log(b_start), math.log(b3)

  def schedule(count):
    frac = jnp.minimum(jnp.asarray(count, jnp.float32) / max(steps, 1), 1.0)
    return jnp.exp(log_start * log_end / ((1 - frac) * log_end + frac * log_start))
  return schedule


def make_optimizer(optim: OptimConfig, max_steps: int, vocab_size: int, *,
                   param_shardings: Any = None) -> optax.GradientTransformationExtraArgs:
  """`optim.name`'s optimizer behind `clip_by_global_norm_with_stats`; every one takes the
  loss / entropy extra args (only Velvet and `entropy_lr` read them).

  `param_shardings`: the trainable params' shardings; the fused Velvet kernel then runs
  per shard (see `velvet(shardings=...)`).
  """
  schedule = lr_schedule(optim, max_steps)
  if optim.name == "velvet":
    return velvet(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, max_grad_norm=optim.max_grad_norm,
                  entropy_adaptive=optim.entropy_adaptive,
                  perplexity_guided=optim.perplexity_guided,
                  sparse_aware=optim.sparse_aware, vocab_size=vocab_size,
                  fused=optim.fused and optim.fused_kernel, shardings=param_shardings,
                  rules=optim.velvet_rules)
  if optim.name == "adamw":
    base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                       weight_decay=optim.weight_decay)
  elif optim.name == "muon":
    base = contrib.muon(schedule, weight_decay=optim.weight_decay, adam_b1=optim.b1,
                        adam_b2=optim.b2, eps=optim.eps,
                        adam_weight_decay=optim.weight_decay,
                        muon_weight_dimension_numbers=muon_dimension_numbers,
                        consistent_rms=MUON_CONSISTENT_RMS)
  elif optim.name == "schedule_free_adamw":
    warmup = warmup_steps(optim, max_steps)
    base = contrib.schedule_free_adamw(  # its warmup_steps=0 would hold the LR at 0
        optim.lr, warmup_steps=warmup or None,
        b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
  elif optim.name == "ademamix":
    alpha = optax.linear_schedule(0.0, ADEMAMIX_ALPHA, max_steps)
    base = contrib.ademamix(schedule, b1=optim.b1, b2=optim.b2,
                            b3=ademamix_b3_schedule(ADEMAMIX_B3, optim.b1, max_steps),
                            alpha=alpha, eps=optim.eps, weight_decay=optim.weight_decay)
  else:
    raise ValueError(f"optim.name {optim.name!r}: expected one of {OPTIMIZERS}")
  parts = [clip_by_global_norm_with_stats(optim.max_grad_norm), base]
  if optim.entropy_lr:
    parts.append(scale_by_velvet_learning_rate(1.0, vocab_size=vocab_size,
                                               flip_sign=False, rules=optim.velvet_rules))
  # the clip records the pre-clip norm for logging; the others ignore extra args
  return optax.chain(*(optax.with_extra_args_support(p) for p in parts))


def eval_params(opt_state: Any, params: Any) -> Any:
  """The parameters to evaluate: schedule-free's averaged iterate x where the state
  holds a `ScheduleFreeState`, else `params` as they are."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, contrib.ScheduleFreeState))
      if isinstance(s, contrib.ScheduleFreeState)]
  return contrib.schedule_free_eval_params(found[0], params) if found else params
