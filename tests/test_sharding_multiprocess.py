"""Two processes x two CPU devices on 127.0.0.1 train a tiny model (dense on data x fsdp;
MoE with expert parallelism across processes, slow) and get the losses of one process
with four devices."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import sharding_train as st
from vesperjax import sharding as sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "sharding_train.py")
STEPS = 2
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(port: int, process_id: int, moe: bool, mesh: str) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("XLA_FLAGS", "JAX_"))}  # own device count, no shared cache
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, SCRIPT, *(["--moe"] if moe else []), "--mesh", mesh,
         "--steps", str(STEPS),
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
         "--process-id", str(process_id), "--local-devices", "2"]
  return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


# slow: the default tier trains two processes against one through SLURM
# (tests/test_slurm.py) and explicit JAX_* variables (tests/test_resume_elsewhere.py)
@pytest.mark.parametrize("moe,mesh", [
    pytest.param(False, "data=2,fsdp=2", marks=pytest.mark.slow),
    pytest.param(True, "data=2,expert=2", marks=pytest.mark.slow)])
def test_two_processes_match_one_process_with_four_devices(moe, mesh):
  port = _free_port()
  procs = [_launch(port, i, moe, mesh) for i in range(2)]
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=TIMEOUT_S)
      assert p.returncode == 0, f"process exited {p.returncode}:\n{err[-3000:]}"
      results.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == 4 for r in results)
  local = sh.make_mesh(**st._mesh_arg(mesh), devices=jax.devices()[:4])
  want = st.train(st.tiny_config(moe), local, STEPS)[0]
  for r in results:
    np.testing.assert_allclose(r["losses"], want, rtol=2e-5, atol=2e-5)
