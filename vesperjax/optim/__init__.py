"""Optimizers: Velvet as composable optax transformations.

``velvet(...)`` is the ready-made optimizer; its math, state and references
are in ``velvet.py``, the split blocks for custom chains in ``velvet_split.py``.
See docs/velvet.md.
"""
from vesperjax.optim.clipping import clip_by_global_norm_with_stats
from vesperjax.optim.clipping import global_norm
from vesperjax.optim.clipping import GlobalNormState
from vesperjax.optim.stats import velvet_stats
from vesperjax.optim.velvet import adapted_b1
from vesperjax.optim.velvet import apply_sparse_mask
from vesperjax.optim.velvet import scale_by_velvet
from vesperjax.optim.velvet import velvet
from vesperjax.optim.velvet import velvet_scales
from vesperjax.optim.velvet import VelvetScales
from vesperjax.optim.velvet import VelvetState
from vesperjax.optim.velvet_math import velvet_update_reference
from vesperjax.optim.velvet_split import scale_by_velvet_learning_rate
from vesperjax.optim.velvet_split import scale_by_velvet_moments
from vesperjax.optim.velvet_split import VelvetLearningRateState
from vesperjax.optim.velvet_split import VelvetMomentsState

__all__ = [
    "velvet",
    "scale_by_velvet",
    "scale_by_velvet_moments",
    "scale_by_velvet_learning_rate",
    "clip_by_global_norm_with_stats",
    "velvet_scales",
    "adapted_b1",
    "apply_sparse_mask",
    "global_norm",
    "velvet_stats",
    "velvet_update_reference",
    "VelvetState",
    "VelvetMomentsState",
    "VelvetLearningRateState",
    "GlobalNormState",
    "VelvetScales",
]
