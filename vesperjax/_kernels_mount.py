"""Make the top-level ``kernels/`` folder importable as ``vesperjax.kernels``.

An installed wheel or an editable install (`pip install -e .`, the documented way) maps
it through setuptools' ``package-dir``. This finder covers the remaining case, a plain
source checkout on ``sys.path``: the GPU acceptance run (docs/gpu-acceptance.md) runs
`python3 benchmarks/gpu_acceptance.py` from a copied working tree on a device machine
where nothing is installed. It is appended after the regular finders, so an install wins.
"""
import importlib.abc
import importlib.util
import pathlib
import sys

_NAME = "vesperjax.kernels"
_DIR = pathlib.Path(__file__).resolve().parent.parent / "kernels"


class _KernelsFinder(importlib.abc.MetaPathFinder):
  def find_spec(self, fullname, path=None, target=None):
    if fullname != _NAME:
      return None
    return importlib.util.spec_from_file_location(
        _NAME, _DIR / "__init__.py", submodule_search_locations=[str(_DIR)])


def install():
  """Append the fallback finder (after the regular ones) when the mapping is missing."""
  if (_DIR / "__init__.py").exists() and not any(
      isinstance(f, _KernelsFinder) for f in sys.meta_path):
    sys.meta_path.append(_KernelsFinder())
