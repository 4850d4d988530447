"""Pallas / Triton kernels for VesperLM's hot paths, each beside its pure-JAX reference.

Installed as ``vesperjax.kernels`` (never as a top-level ``kernels``: PyPI has one).
"""
