"""Kernels and backend-specific forms of VesperLM's hot paths, beside pure-JAX references.

Installed as ``vesperjax.kernels`` (never as a top-level ``kernels``: PyPI has one).

The package exports functions; the private modules that hold them (``_era``,
``_attention``, ...) are imported on first use, so importing this package stays cheap
(no Pallas). Exports:

* ``velvet_update`` (fused Velvet / AdamW step), ``era`` / ``era_gated`` (the ERA
  activation), ``linear_cross_entropy`` (loss and entropy without the logits),
  ``attention``: each with its pure-JAX ``*_reference``;
* ``GroupLayout`` / ``grouped_matmul`` (MoE rows grouped by expert), ``rows_matmul``
  (token-row matmul), ``partitionable_top_k`` (top-k that shards over the batch).

Every backend choice reads the target platform of the graph being traced, through the
one table ``platform.CHOICES`` (``vesperjax.kernels.platform``, a public module), never
the host's. The Pallas kernels also take ``impl="auto" | "pallas" | "reference"``, whose
process default is ``set_default_impl`` or the ``VESPERJAX_KERNELS`` environment variable.
"""
import importlib

from ._dispatch import get_default_impl, set_default_impl  # noqa: F401

_EXPORTS = {
    "velvet_update": "_velvet_update",
    "velvet_update_reference_jnp": "_velvet_update",
    "era": "_era",
    "era_reference": "_era",
    "era_gated": "_era",
    "linear_cross_entropy": "_cross_entropy",
    "linear_cross_entropy_reference": "_cross_entropy",
    "attention": "_attention",
    "attention_reference": "_attention",
    "attention_implementation": "_attention",
    "GroupLayout": "_grouped_matmul",
    "grouped_matmul": "_grouped_matmul",
    "rows_matmul": "_rows_matmul",
    "partitionable_top_k": "_top_k",
}
__all__ = ["get_default_impl", "set_default_impl", *_EXPORTS]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
