"""Module paths from before the training/inference/planning folders still import, for one
release, with a DeprecationWarning, and give the same objects as the new homes."""
import importlib
import sys

import pytest

from vesperjax.old_paths import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_and_forwards_to_the_new_home(old):
  sys.modules.pop(old, None)
  with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old][0]}"):
    module = importlib.import_module(old)
  home = importlib.import_module(MOVED[old][0])
  public = [n for n in vars(home) if not n.startswith("_")]
  assert public and all(getattr(module, n) is getattr(home, n) for n in public)
  with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
    getattr(module, "no_such_name")


def test_build_load_model_keeps_its_old_import():
  from vesperjax.inference.loading import load_model
  from vesperjax.training.build import build_run
  sys.modules.pop("vesperjax.build", None)
  with pytest.warns(DeprecationWarning):
    from vesperjax.build import build_run as old_build_run, load_model as old_load_model
  assert old_load_model is load_model and old_build_run is build_run


def test_new_modules_win_over_the_old_paths():
  from vesperjax import train  # a real module beside the moved ones
  assert type(train.__spec__.loader).__name__ != "OldPathFinder"
