"""VesperLM in Flax NNX."""
from vesperjax.model.attention import KVCache
from vesperjax.model.layers import FrozenProjection, RoutingBias
from vesperjax.model.transformer import VesperLM, abstract_model, trainable_filter

__all__ = ["VesperLM", "abstract_model", "KVCache", "FrozenProjection", "RoutingBias", "trainable_filter"]
