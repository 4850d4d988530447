"""VesperLM in Flax NNX."""
from vesperjax.model.attention import KVCache
from vesperjax.model.layers import FrozenProjection, RoutingBias
from vesperjax.model.transformer import VesperLM, trainable_filter

__all__ = ["VesperLM", "KVCache", "FrozenProjection", "RoutingBias", "trainable_filter"]
