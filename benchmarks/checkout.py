"""Run vesperjax from a plain source checkout, with nothing installed (how the GPU
acceptance run starts on a device machine): the checkout goes on sys.path, and the
top-level kernels/ folder becomes `vesperjax.kernels`, as an install's package-dir
mapping makes it. An installed vesperjax is left as it is."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mount_kernels(root: Path = ROOT) -> None:
  if str(root) not in sys.path:
    sys.path.insert(0, str(root))
  if "vesperjax.kernels" in sys.modules or importlib.util.find_spec("vesperjax.kernels"):
    return  # installed (or already mounted): its mapping wins
  spec = importlib.util.spec_from_file_location(
      "vesperjax.kernels", root / "kernels" / "__init__.py",
      submodule_search_locations=[str(root / "kernels")])
  module = importlib.util.module_from_spec(spec)
  sys.modules["vesperjax.kernels"] = module
  spec.loader.exec_module(module)
  import vesperjax  # pylint: disable=import-outside-toplevel
  vesperjax.kernels = module
