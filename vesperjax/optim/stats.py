"""Find Velvet's loggable scalars anywhere in an (optax-wrapped) state tree."""
from typing import Any

import jax

from vesperjax.optim import clipping
from vesperjax.optim.velvet import VelvetState
from vesperjax.optim.velvet_split import VelvetLearningRateState
from vesperjax.optim.velvet_split import VelvetMomentsState

# State type -> the fields a trainer logs.
_FIELDS = {
    VelvetState: (
        "learning_rate", "b1", "entropy_scale", "perplexity_scale"),
    VelvetMomentsState: ("b1", "perplexity_scale"),
    VelvetLearningRateState: ("learning_rate", "entropy_scale"),
    clipping.GlobalNormState: ("grad_norm",),
}
_TYPES = tuple(_FIELDS)


def velvet_stats(opt_state: Any) -> dict[str, jax.Array]:
  """``{'learning_rate', 'b1', 'entropy_scale', 'perplexity_scale', 'grad_norm'}``.

  Walks any nesting (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
  ``masked``, ``multi_transform``, ``apply_if_finite``). Values stay device
  scalars (jit-friendly; convert when logging). The first occurrence of a
  field gets the plain name; later ones (e.g. one Velvet per
  ``multi_transform`` group) get ``name@<tree path>``.
  """
  found = jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=lambda x: isinstance(x, _TYPES))[0]
  out = {}
  for path, node in found:
    if not isinstance(node, _TYPES):
      continue
    for field in _FIELDS[type(node)]:
      key = field if field not in out else (
          f"{field}@{jax.tree_util.keystr(path)}")
      out[key] = getattr(node, field)
  return out
