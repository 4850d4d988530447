"""Pallas / Triton kernels for VesperLM's hot paths, each beside its pure-JAX reference.

Installed as ``vesperjax.kernels`` (never as a top-level ``kernels``: PyPI has one).

Submodules (imported on first use, so importing this package stays cheap) hold one kernel
each, named after its function: ``velvet_update.velvet_update``, ``era.era``,
``cross_entropy.linear_cross_entropy``, ``attention.attention``. The package attributes
``velvet_update``, ``era`` and ``attention`` are those submodules (a submodule import would
shadow a same-named function anyway). Implementation switch: every kernel takes
``impl="auto" | "pallas" | "reference"``; the process default is ``set_default_impl`` or
the ``VESPERJAX_KERNELS`` environment variable. Every backend choice reads the target
platform of the graph being traced (``vesperjax.kernels.platform``), not the host's.
"""
import importlib

from ._dispatch import get_default_impl, set_default_impl  # noqa: F401

_SUBMODULES = ("era", "cross_entropy", "attention")
_FUNCTIONS = {
    "velvet_update": "_velvet_update",
    "velvet_update_reference_jnp": "_velvet_update",
    "era_reference": "era",
    "linear_cross_entropy": "cross_entropy",
    "linear_cross_entropy_reference": "cross_entropy",
    "attention_reference": "attention",
}
__all__ = ["get_default_impl", "set_default_impl", *_SUBMODULES, *_FUNCTIONS]


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f".{name}", __name__)
  if name in _FUNCTIONS:
    return getattr(importlib.import_module(f".{_FUNCTIONS[name]}", __name__), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
