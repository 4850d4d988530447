"""Kernel implementation switch: keyword, process default, environment variable."""
import pytest

from vesperjax import kernels
from vesperjax.kernels import _dispatch


def test_resolve_on_cpu(monkeypatch):
  monkeypatch.delenv("VESPERJAX_KERNELS", raising=False)
  kernels.set_default_impl(None)
  assert kernels.get_default_impl() == "auto"
  assert _dispatch.resolve() == (False, False)            # auto -> reference off GPU
  assert _dispatch.resolve("pallas") == (True, True)      # forced -> interpret off GPU
  assert _dispatch.resolve("auto", interpret=True) == (True, True)
  assert _dispatch.resolve("reference", interpret=True) == (False, False)
  monkeypatch.setenv("VESPERJAX_KERNELS", "pallas")
  assert _dispatch.resolve() == (True, True)
  kernels.set_default_impl("reference")
  try:
    assert _dispatch.resolve() == (False, False)          # explicit default beats env
  finally:
    kernels.set_default_impl(None)
  monkeypatch.setenv("VESPERJAX_KERNELS", "bogus")
  with pytest.raises(ValueError):
    _dispatch.resolve()
  with pytest.raises(ValueError):
    kernels.set_default_impl("triton")


def test_lazy_exports():
  assert callable(kernels._velvet_update.velvet_update)
  assert callable(kernels.era.era) and callable(kernels.era_reference)
  assert callable(kernels.linear_cross_entropy)
  assert callable(kernels.attention.attention)
