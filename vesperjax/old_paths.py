"""Module paths from before the training/inference/planning folders, kept importable for
one release (removed in 0.3) with a DeprecationWarning naming the new home.

`import vesperjax.build` gives a module whose attributes are looked up in the new homes
in order (`load_model` moved to `inference.loading`, the rest of `build` to
`training.build`), so `from vesperjax.build import load_model` keeps working too.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {  # old module: its new homes, searched in order
    "vesperjax.build": ("vesperjax.training.build", "vesperjax.inference.loading"),
    "vesperjax.trainer": ("vesperjax.training.trainer",),
    "vesperjax.train_step": ("vesperjax.training.train_step",),
    "vesperjax.actions": ("vesperjax.training.actions",),
    "vesperjax.divergence": ("vesperjax.training.divergence",),
    "vesperjax.workdir_lock": ("vesperjax.training.workdir_lock",),
    "vesperjax.wandb_tracking": ("vesperjax.training.wandb_tracking",),
    "vesperjax.calibration": ("vesperjax.training.calibration",),
    "vesperjax.sampling": ("vesperjax.inference.sampling",),
    "vesperjax.penalties": ("vesperjax.inference.penalties",),
    "vesperjax.quantize": ("vesperjax.inference.quantize",),
    "vesperjax.pretrained": ("vesperjax.inference.pretrained",),
    "vesperjax.plan_search": ("vesperjax.planning.search",),
    "vesperjax.gpu_targets": ("vesperjax.planning.gpu_targets",),
}


class OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds the old paths of `MOVED` (only those) and loads each as a forwarding module."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname in MOVED:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    homes = MOVED[spec.name]
    warnings.warn(f"{spec.name} moved to {' and '.join(homes)}; the old path goes in 0.3",
                  DeprecationWarning, stacklevel=2)
    modules = [importlib.import_module(h) for h in homes]
    forward = types.ModuleType(spec.name, modules[0].__doc__)

    def __getattr__(name):
      for m in modules:
        if hasattr(m, name):
          return getattr(m, name)
      raise AttributeError(f"module {spec.name!r} has no attribute {name!r}")

    forward.__getattr__ = __getattr__
    return forward

  def exec_module(self, module):
    pass


def install() -> None:
  if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
    sys.meta_path.append(OldPathFinder())  # last: real modules always win
