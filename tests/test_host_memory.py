"""`python -m vesperjax.*` keeps freed host memory on the CPU backend (no page faults)."""
import os
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
sys.argv = ["-m"] if sys.argv[1] == "cli" else sys.argv  # as during `python -m vesperjax.x`
import vesperjax
from vesperjax import host_memory
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.exp(x) @ x.T).sum())  # fresh 64 MB temporaries per call
x = jnp.ones((4096, 2048))
f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(host_memory._applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


def probe(mode, **env):
  clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
  clean.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env},
                       capture_output=True, text=True, timeout=300, check=True)
  applied, faults = out.stdout.split()[-2:]
  return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_cli_start_keeps_freed_memory():
  applied, faults = probe("cli", JAX_PLATFORMS="cpu")
  plain_applied, plain_faults = probe("library", JAX_PLATFORMS="cpu")
  assert applied and not plain_applied
  # 64 MB of fresh pages is ~16k faults a call under glibc's defaults
  assert plain_faults > 10_000 and faults < plain_faults / 20, (faults, plain_faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.slow  # a second CLI start, beside test_cli_start_keeps_freed_memory's
def test_opt_out_leaves_glibc_alone():
  assert not probe("cli", JAX_PLATFORMS="cpu", VESPERJAX_HOST_MALLOC="default")[0]


def test_accelerators_leave_glibc_alone(monkeypatch):
  from vesperjax import host_memory
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory._cpu_only()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory._cpu_only()
