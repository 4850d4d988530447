"""benchmarks/tpu_acceptance.py: its kernel section in reduced mode on CPU (the Velvet
TPU kernel in Pallas's TPU interpreter, the `tpu` rows' candidates against their
references), the whole reduced run (slow), and the plan beside each throughput row."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tpu_util

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "tpu_acceptance.py"
sys.path.insert(0, str(SCRIPT.parent))
import throughput_checks  # noqa: E402  (benchmarks/, beside the script)


def _run(out, *extra):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--out", str(out), *extra],
                        capture_output=True, text=True, timeout=1200, cwd=ROOT)
  return proc, json.loads((out / "acceptance.json").read_text())


def test_reduced_kernels_pass_against_their_references(tmp_path):
  proc, report = _run(tmp_path, "--only", "kernels")
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (tmp_path / "acceptance.md").read_text().startswith("# TPU acceptance (reduced)")
  kernels = report["sections"]["kernels"]
  assert kernels["interpret"] is True and kernels["device"]["backend"] == "cpu"
  checks = {c["name"]: c for c in kernels["checks"]}
  for part in ("velvet_update kernel=tpu skip_zero_grads=True float32",
               "velvet_update kernel=tpu skip_zero_grads=True bfloat16",
               "linear_ce impl=chunked fwd+bwd+entropy float32",
               "linear_ce impl=chunked fwd+bwd+entropy bfloat16",
               "attention impl=auto", "attention impl=splash", "attention impl=blocked",
               "attention impl=xla",
               "grouped_matmul impl=auto", "grouped_matmul impl=blocked",
               "grouped_matmul impl=ragged_dot"):
    assert any(part in name for name in checks), part
  for name, c in checks.items():
    if c.get("skipped"):  # tokamax's Mosaic kernels on their own: a TPU only
      assert "tokamax:mosaic" in name and "GPU or TPU" in c["note"], c
      continue
    assert c["passed"] is True, c
    assert all(e["error"] is not None and e["error"] <= e["threshold"]
               for e in c["errors"].values()), c


@pytest.mark.slow
def test_reduced_run_passes_with_throughput_rows(tmp_path):
  proc, report = _run(tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert set(report["sections"]) == {"kernels", "throughput"}
  models = report["sections"]["throughput"]["models"]
  assert [m["preset"] for m in models] == ["small", "medium", "xlarge"]
  for m in models:
    # FSDP over every local device (the suite's 8 simulated CPUs), 2 sequences each
    assert m["status"] == "ok" and m["batch"] == 2 * m["devices"] and m["tokens_per_s"] > 0, m
    assert m["plan_note"] == "reduced mode: no deviceless plan"


@tpu_util.needs_tpu_compile
def test_plan_beside_a_throughput_row_is_the_hosts_slice():
  """The plan of a v5e host (8 chips: the 2x4 target) is compiled for that slice; a host
  of another chip count or an unknown chip gets a note, never another slice's figure."""
  run, batch, _ = throughput_checks.model_run("small", True, 8, throughput_checks.TPU_MODELS)
  assert batch == 16 and run.mesh.fsdp == 8
  ctx = argparse.Namespace(reduced=False, backend="tpu", device={"kind": "TPU v5 lite"})
  got = throughput_checks.plan_figure(ctx, dict(devices=8), run)
  assert (got["plan_target"], got["plan_topology"], got["plan_fits"]) == ("v5e", "2x4", True)
  assert 0 < got["plan_bytes"] < 16 << 20  # a 2-layer stand-in: megabytes per chip
  assert "2x4" in throughput_checks.plan_figure(ctx, dict(devices=4), run)["plan_note"]
  ctx.device = {"kind": "TPU v9"}
  assert "no plan target" in throughput_checks.plan_figure(ctx, dict(devices=8), run)["plan_note"]
