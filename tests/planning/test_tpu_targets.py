"""vesperjax.planning.tpu_targets: the TPU generations' facts against what libtpu itself
reports (device kinds, chips and hosts of a slice, the HBM it compiles against), the
topology checks, and the libtpu check's message. The libtpu tests skip, saying why,
without it (tests/tpu_util.py)."""
import importlib.metadata
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tests import tpu_util
from vesperjax.planning import tpu_targets

GiB = 2**30


@tpu_util.needs_tpu_compile
@pytest.mark.parametrize("name,topology,chips,hosts,kind", [
    ("v4", None, 4, 1, "TPU v4"),  # v4-8: 2x2x1, one device per chip (megacore)
    ("v5e", None, 8, 1, "TPU v5 lite"),  # v5e-8: one 8-chip host
    ("v5e", "4x4", 16, 2, "TPU v5 lite"),  # Google's table: 4x4 is 2 hosts
    ("v5e", "2x2", 4, 1, "TPU v5 lite"),
    ("v5p", None, 4, 1, "TPU v5"),  # v5p-8: 2x2x1
    ("v5p", "2x2x2", 8, 2, "TPU v5"),
    ("v6e", None, 8, 1, "TPU v6 lite"),
])
def test_slices_as_libtpu_makes_them(name, topology, chips, hosts, kind):
  devs = tpu_targets.devices(name, topology)
  assert len(devs) == chips == tpu_targets.chips(tpu_targets.check_topology(name, topology))
  assert tpu_targets.hosts(devs) == hosts
  assert {d.device_kind for d in devs} == {kind} == {tpu_targets.device_kind(name)}


def _available_hbm(name: str) -> int:
  """The HBM libtpu compiles one chip's program against, from its out-of-memory error
  for a program that needs 128 GiB of temporaries."""
  on = NamedSharding(Mesh(tpu_targets.devices(name)[:1], ("x",)), P())
  x = jax.ShapeDtypeStruct((2**17,), jnp.float32, sharding=on)
  outer_sorted = jax.jit(lambda x: jnp.sort(jnp.outer(x, x), axis=0).sum(0))
  with pytest.raises(Exception, match="Ran out of memory") as caught:
    with tpu_targets.deviceless(name):
      outer_sorted.trace(x).lower().compile()
  found = re.search(r"exceeds available HBM \(([\d.]+)G\)", str(caught.value))
  return int(float(found[1]) * GiB)


@tpu_util.needs_tpu_compile
@pytest.mark.parametrize("name", tpu_targets.TARGETS)
def test_hbm_per_chip_is_what_libtpu_compiles_against(name):
  """The spec-sheet HBM (v4 32 GiB, v5e 16, v5p 95, v6e 32) against libtpu's own limit:
  a little below it (what libtpu reserves), never above."""
  spec = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}[name]
  g = tpu_targets.generation(name)
  assert g.hbm_bytes == tpu_targets.device_memory_bytes(name) == spec
  available = _available_hbm(name)
  assert available == pytest.approx(g.compiler_hbm_bytes, abs=0.01 * GiB)
  assert 0.95 * spec < available < spec + GiB  # v5p: 95.74 GiB of a "95 GB" chip


def test_topology_shapes():
  assert tpu_targets.check_topology("v5e") == "2x4"
  assert tpu_targets.check_topology("v5p", "2x2x2") == "2x2x2"
  for name, bad in [("v5e", "2x2x2"), ("v4", "2x2"), ("v6e", "2by4"), ("v5e", "0x4"),
                    ("v5e", "")]:
    with pytest.raises(ValueError, match="--topology"):
      tpu_targets.check_topology(name, bad)
  with pytest.raises(ValueError, match="unknown TPU target 'v7'"):
    tpu_targets.check_topology("v7")
  # one host holds a slice up to its chips; bigger v5e / v6e slices are 2x4 hosts
  assert tpu_targets.host_bounds("v5e", "2x4") == (2, 4, 1)
  assert tpu_targets.host_bounds("v5e", "4x4") == (2, 4, 1)
  assert tpu_targets.host_bounds("v5p", "2x2x1") == (2, 2, 1)
  assert tpu_targets.host_bounds("v5p", "2x2x2") is None  # libtpu's 4-chip hosts


def test_libtpu_problem_names_the_extra(monkeypatch):
  real = importlib.metadata.version

  def missing(name):
    if name == "libtpu":
      raise importlib.metadata.PackageNotFoundError(name)
    return real(name)

  monkeypatch.setattr(importlib.metadata, "version", missing)
  assert "vesperjax[tpu-compile]" in tpu_targets.libtpu_problem()
  monkeypatch.setattr(importlib.metadata, "version",
                      lambda name: "0.0.1" if name == "libtpu" else real(name))
  problem = tpu_targets.libtpu_problem()
  assert "libtpu 0.0.1 is not the one jax" in problem and "tpu-compile" in problem
