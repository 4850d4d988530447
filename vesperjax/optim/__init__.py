"""Optimizers: Velvet as composable optax transformations.

``velvet(...)`` is the ready-made optimizer; the blocks it is chained from are
exported for custom chains. See docs/velvet.md.
"""
from vesperjax.optim.alias import velvet
from vesperjax.optim.clipping import clip_by_global_norm_with_stats
from vesperjax.optim.clipping import global_norm
from vesperjax.optim.clipping import GlobalNormState
from vesperjax.optim.signals import adapted_b1
from vesperjax.optim.signals import velvet_scales
from vesperjax.optim.signals import VelvetScales
from vesperjax.optim.stats import velvet_stats
from vesperjax.optim.transform import apply_sparse_mask
from vesperjax.optim.transform import scale_by_velvet
from vesperjax.optim.transform import scale_by_velvet_learning_rate
from vesperjax.optim.transform import scale_by_velvet_moments
from vesperjax.optim.transform import VelvetLearningRateState
from vesperjax.optim.transform import VelvetMomentsState
from vesperjax.optim.transform import VelvetState
from vesperjax.optim.velvet import velvet_update_reference

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
