"""vesperjax: VesperLM and the Velvet optimizer in JAX / Flax NNX."""
from vesperjax import _kernels_mount

_kernels_mount.install()

__version__ = "0.1.0"
