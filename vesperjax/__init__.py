"""vesperjax: VesperLM and the Velvet optimizer in JAX / Flax NNX."""
from vesperjax import _kernels_mount

_kernels_mount.install()

from vesperjax.config import PRESET_NAMES, ModelConfig, model_preset, num_params  # noqa: E402
from vesperjax.model import VesperLM, trainable_filter  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ModelConfig", "model_preset", "num_params", "VesperLM", "trainable_filter",
           "PRESET_NAMES"]
