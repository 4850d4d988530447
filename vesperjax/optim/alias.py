"""``velvet()``: the ready-made optimizer, chained from the building blocks."""
from typing import Any, Callable, Optional, Union

import optax

from vesperjax.optim import clipping
from vesperjax.optim import transform


def velvet(
    learning_rate: transform.ScalarOrSchedule = 5e-4,
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-8,
    weight_decay: Any = 1e-3,
    max_grad_norm: Optional[Any] = 1.0,
    entropy_adaptive: bool = True,
    perplexity_guided: bool = True,
    sparse_aware: bool = True,
    vocab_size: Optional[Any] = None,
    fused: bool = False,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    mu_dtype: Optional[Any] = None,
    *,
    shardings: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Velvet: AdamW with an entropy-adaptive lr and a perplexity-guided b1.

  ``chain(clip_by_global_norm_with_stats(max_grad_norm), scale_by_velvet(...))``.
  Call ``update(grads, state, params, loss=mean_loss, entropy=mean_entropy)``;
  both are optional fp32 scalars (traced is fine: nothing leaves the device).
  Without them, or with both adaptive features off, it is ``optax.adamw``
  (after clipping; ``max_grad_norm=None`` or ``inf`` disables clipping).

  Args:
    learning_rate: float or optax schedule (evaluated at the 0-based step).
    b1, b2, eps, weight_decay: AdamW's; weight decay is decoupled, ``lr_t * wd``.
    max_grad_norm: global-norm clipping threshold, applied first.
    entropy_adaptive: lr_t = lr * es. Requires ``vocab_size``: a ValueError is
      raised at construction otherwise (es normalises the entropy by ln V).
    perplexity_guided: b1_t = clip(b1 * ps, 0.5, 0.999).
    sparse_aware: lazy update of entries with exactly-zero gradient (or masked
      out by the ``sparse_mask=`` extra arg): p, m, v unchanged, no decay.
    vocab_size: V.
    fused: use the Pallas kernel ``vesperjax.kernels.velvet_update``.
    mask: weight-decay mask, as ``optax.adamw``'s.
    mu_dtype: dtype of the moments (default fp32).
    shardings: the params' shardings (pytree of ``NamedSharding``); with
      ``fused=True`` the kernel runs per shard (see ``scale_by_velvet``).
  """
  return optax.chain(
      clipping.clip_by_global_norm_with_stats(max_grad_norm),
      transform.scale_by_velvet(
          learning_rate, b1, b2, eps, weight_decay,
          entropy_adaptive=entropy_adaptive,
          perplexity_guided=perplexity_guided, vocab_size=vocab_size,
          sparse_aware=sparse_aware, fused=fused, mask=mask,
          mu_dtype=mu_dtype, shardings=shardings))
