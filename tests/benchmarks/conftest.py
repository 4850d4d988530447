"""Fixtures of the tests of benchmarks/ scripts: `fake_original`."""
import pytest


@pytest.fixture
def fake_original(tmp_path):
  """An empty stand-in for a checkout of the original (python/train.py and
  python/vesper/model.py), enough for the side-by-side scripts' argument checks."""
  pkg = tmp_path / "checkout" / "python"
  (pkg / "vesper").mkdir(parents=True)
  (pkg / "train.py").write_text("")
  (pkg / "vesper" / "model.py").write_text("")
  return pkg.parent
