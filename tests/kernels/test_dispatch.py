"""Kernel implementation switch (keyword, process default, environment variable) and the
package's exports."""
import os
import pathlib
import subprocess
import sys

import pytest

from vesperjax import kernels
from vesperjax.kernels import (_attention, _cross_entropy, _dispatch, _era, _grouped_matmul,
                               _rows_matmul, _top_k, _velvet_update)


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
  """The package's names are the functions of its private modules."""
  assert kernels.velvet_update is _velvet_update.velvet_update
  assert kernels.era is _era.era and kernels.era_reference is _era.era_reference
  assert kernels.era_gated is _era.era_gated
  assert kernels.linear_cross_entropy is _cross_entropy.linear_cross_entropy
  assert kernels.attention is _attention.attention
  assert kernels.GroupLayout is _grouped_matmul.GroupLayout
  assert kernels.grouped_matmul is _grouped_matmul.grouped_matmul
  assert kernels.rows_matmul is _rows_matmul.rows_matmul
  assert kernels.partitionable_top_k is _top_k.partitionable_top_k
  assert all(callable(getattr(kernels, name)) for name in kernels.__all__)
  with pytest.raises(AttributeError, match="no attribute 'bogus'"):
    kernels.bogus  # pylint: disable=pointless-statement


# The package imports no Pallas until a kernel is used, and a plain source checkout
# (no install: how the GPU acceptance run starts) finds it through benchmarks/checkout.py.
_SOURCE_CHECKOUT = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from checkout import mount_kernels
mount_kernels()
import vesperjax.kernels as k
assert not [m for m in sys.modules if "pallas" in m], "importing the package imported Pallas"
print(k.era.__module__, k.__file__)
"""


def test_package_is_lazy_and_found_from_a_source_checkout(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[2]
  out = subprocess.run([sys.executable, "-c", _SOURCE_CHECKOUT, str(root)], cwd=tmp_path,
                       capture_output=True, text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.split()
  assert out == ["vesperjax.kernels._era", str(root / "kernels" / "__init__.py")]
