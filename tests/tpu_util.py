"""Helpers for the deviceless TPU compile tests (no TPU needed).

libtpu (the `tpu-compile` extra) compiles for TPU topologies it has never seen:
`jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name=...)` gives
compile-only devices (with `process_index` and, for several slices, `slice_index`), and
a jitted function traced on arguments placed on them compiles with every libtpu pass,
Pallas Mosaic TPU kernels included (unlike Mosaic GPU, they are compiled here, not on the
device). `needs_tpu_compile` skips, saying why, where libtpu is missing or refuses.

`abstract_steps(run, devices)` (tests/abstract_steps.py) builds the real train/eval steps of a run on such devices (the
mesh from `mesh.*`, hybrid ICI/DCN when the devices span slices); `compile_steps`
compiles them.
"""
import collections
import functools
import importlib.metadata
import re

# first: TPU_SKIP_MDS_QUERY (libtpu asks a GCE metadata server for the host's TPU
# otherwise, a long timeout here) and ALLOW_MULTIPLE_LIBTPU_LOAD (libtpu holds
# /tmp/libtpu_lockfile otherwise, failing any second process that loads it meanwhile:
# parallel test runs, a benchmark beside them)
from vesperjax.planning import tpu_targets

import jax  # noqa: E402
import pytest  # noqa: E402

from vesperjax.planning.compile_only import no_compilation_cache  # noqa: E402
from tests.abstract_steps import abstract_steps, small_run  # noqa: E402

MOSAIC = "tpu_custom_call"  # a Pallas Mosaic TPU kernel in compiled HLO
# HBM per chip of each generation
HBM_BYTES = {name: g.hbm_bytes for name, g in tpu_targets.GENERATIONS.items()}


def _problem() -> str | None:
  """Why deviceless TPU compiles cannot run here (None when they can)."""
  try:
    version = importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return ("libtpu is not installed (pip install 'vesperjax[tpu-compile]'): the TPU "
            "compile tests need it")
  try:
    topology("v5e:2x2")
  except Exception as e:  # noqa: BLE001  (libtpu of another jax, broken install)
    return f"libtpu {version} gives no TPU topology here: {type(e).__name__}: {e}"
  return None


@functools.lru_cache(maxsize=None)
def topology(name: str, num_slices: int = 1):
  """Compile-only TPU devices of `name` (e.g. "v5e:4x4", "v5p:2x2x1") x `num_slices`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
  return topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs)


def devices(name: str, num_slices: int = 1) -> list:
  return list(topology(name, num_slices).devices)


TPU_COMPILE_PROBLEM = _problem()
needs_tpu_compile = pytest.mark.skipif(TPU_COMPILE_PROBLEM is not None,
                                       reason=str(TPU_COMPILE_PROBLEM))


def run_config(preset="tiny", *, layers=2, seq_len=96, batch=8, **overrides):
  """A small validated run for train.platform="tpu"; overrides as section__key=value.
  seq_len 96 is no other dimension of the tiny presets' arrays (128 is: an FSDP half of
  hidden 256), so a [96, 96] buffer can only be attention's scores."""
  return small_run(preset, "tpu", layers=layers, seq_len=seq_len, batch=batch,
                   **overrides)


def compile_for_tpu(fn, *args):
  """`fn` (jitted) compiled for the TPU devices its arguments' shardings name."""
  with no_compilation_cache():  # tests/conftest.py turns the cache on
    return fn.trace(*args).lower().compile()


def compile_steps(run, devs, *, evaluate=True):
  """The compiled train step (and eval step, or None) of `run` on `devs`."""
  mesh, built, batch, tokens = abstract_steps(run, devs)
  with jax.set_mesh(mesh):
    train = compile_for_tpu(built.train_step, built.abstract, batch)
    ev = compile_for_tpu(built.eval_step, built.abstract, tokens) if evaluate else None
  return train, ev


_CALL = re.compile(r'custom_call_target="([^"]+)"')
_BUFFER = re.compile(r"\b(?:f32|bf16|f16)\[([\d,]+)\]")


def custom_calls(hlo_text: str) -> collections.Counter:
  """Custom-call targets in compiled HLO text (Mosaic TPU kernels: MOSAIC)."""
  return collections.Counter(_CALL.findall(hlo_text))


def buffer_shapes(hlo_text: str) -> set[tuple[int, ...]]:
  """Every float array shape that appears in compiled HLO text."""
  return {tuple(int(d) for d in dims.split(",")) for dims in _BUFFER.findall(hlo_text)}


def has_square_buffer(hlo_text: str, seq: int) -> bool:
  """Whether some float array ends in [seq, seq]: attention scores held whole."""
  return any(len(s) >= 2 and s[-2:] == (seq, seq) for s in buffer_shapes(hlo_text))
