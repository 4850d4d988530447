"""vesperjax: VesperLM and the Velvet optimizer in JAX / Flax NNX."""
import sys

if sys.argv[:1] == ["-m"]:  # `python -m vesperjax.<command>` is starting: tune glibc
  from vesperjax.host_memory import keep_freed_memory  # before numpy/XLA start threads
  keep_freed_memory()

from vesperjax import old_paths  # noqa: E402

old_paths.install()

_EXPORTS = {"ModelConfig": "config", "model_preset": "config", "num_params": "model.size",
            "PRESET_NAMES": "config", "VesperLM": "model", "trainable_filter": "model",
            "load_pretrained": "inference.pretrained"}


def __getattr__(name):
  """Import jax-dependent parts on first use, so `import vesperjax.host_memory` is light."""
  if name in _EXPORTS:
    import importlib
    return getattr(importlib.import_module(f"vesperjax.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'vesperjax' has no attribute {name!r}")

__version__ = "0.1.0"
__all__ = ["ModelConfig", "model_preset", "num_params", "VesperLM", "trainable_filter",
           "PRESET_NAMES", "load_pretrained"]
