"""benchmarks/gpu_acceptance.py: the reduced (CPU) run end to end as a subprocess, and
checks that can fail (a broken reference, a NaN, a section that dies)."""
import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
SECTIONS = ("kernels", "bench", "throughput", "timing")
_spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
ga = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ga)


def _run(out, *extra):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--reduced", "--out", str(out), *extra],
                        capture_output=True, text=True, timeout=1200, cwd=ROOT)
  report = json.loads((out / "acceptance.json").read_text())
  return proc, report


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
  out = tmp_path_factory.mktemp("acceptance")
  proc, report = _run(out)
  return proc, report, out


def test_reduced_run_passes_and_writes_both_files(reduced):
  proc, report, out = reduced
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert (out / "acceptance.md").read_text().startswith("# GPU acceptance (reduced)")
  assert report["mode"] == "reduced" and report["failed"] == []


def test_every_section_is_there_with_its_keys(reduced):
  _, report, _ = reduced
  sections = report["sections"]
  assert set(sections) == set(SECTIONS)
  for name in SECTIONS:
    sec = sections[name]
    assert sec["status"] == "ok", (name, sec)
    assert {"device", "wall_s", "box_s", "cpu_s", "done"} <= set(sec), name
    assert sec["device"]["backend"] == "cpu"
  bench = sections["bench"]
  assert bench["size"] == "tiny" and bench["rows"]
  for row in bench["rows"]:
    assert set(row) == {"name", "ms", "gb_s", "tflop_s", "roof_pct", "temp_mb", "note"}
    assert row["note"] == "" and row["ms"] > 0, row
  names = " ".join(r["name"] for r in bench["rows"])
  for kernel in ("velvet_update impl=pallas", "era fwd+bwd", "impl=chunked", "attention"):
    assert kernel in names
  timing = sections["timing"]
  assert {r["group"] for r in timing["rows"]} == {"attention", "cross_entropy"}
  assert all(r["ms"] and r["ms"] > 0 for r in timing["rows"]), timing["rows"]
  assert set(timing["fastest"]) == {"attention", "cross_entropy"}
  assert timing["fastest"]["cross_entropy"] in ("chunked", "pallas")


def test_kernel_checks_ran_interpreted_and_passed(reduced):
  _, report, _ = reduced
  kernels = report["sections"]["kernels"]
  assert kernels["interpret"] is True
  checks = {c["name"]: c for c in kernels["checks"]}
  for part in ("velvet_update kernel=triton skip_zero_grads=True float32",
               "velvet_update kernel=triton skip_zero_grads=True bfloat16",
               "velvet_update kernel=mosaic skip_zero_grads=True float32",
               "velvet_update kernel=mosaic skip_zero_grads=True bfloat16",
               "era fwd+bwd float32",
               "era fwd+bwd bfloat16", "linear_ce impl=pallas fwd+bwd+entropy float32",
               "linear_ce impl=pallas fwd+bwd+entropy bfloat16", "impl=auto", "impl=tokamax",
               "impl=xla", "impl=blocked"):
    assert any(part in name for name in checks), part
  for name, c in checks.items():
    if c.get("skipped"):
      assert ("cudnn" in name or "tokamax:" in name) and c["passed"] is None
      continue
    assert c["passed"] is True, c
    assert all(e["error"] is not None and e["error"] <= e["threshold"]
               for e in c["errors"].values()), c
    assert c["error"] <= c["threshold"]
  ce = next(c for n, c in checks.items() if "linear_ce" in n and "float32" in n)
  assert set(ce["errors"]) == {"loss", "entropy", "dh", "dw"}
  assert ce["errors"]["dh"]["kind"] == "float32"  # interpret mode: true fp32 dots


def test_throughput_rows_for_the_three_presets(reduced):
  _, report, _ = reduced
  models = report["sections"]["throughput"]["models"]
  assert [m["preset"] for m in models] == ["small", "medium", "xlarge"]
  for m in models:
    assert m["status"] == "ok", m
    assert m["tokens_per_s"] > 0 and m["step_s_median"] > 0 and m["compile_s"] > 0
    assert m["tokens_per_step"] == m["batch"] * m["seq_len"]
    assert m["flops_per_token"] > 0 and m["params"] > 0 and math.isfinite(m["final_loss"])
    assert m["compiler_bytes"]["total"] > 0 and m["mfu"] is None  # no peak for a CPU
    assert "plan_bytes" in m and "measured_peak_bytes" in m


def test_markdown_table_is_printed_last(reduced):
  proc, report, out = reduced
  lines = proc.stdout.rstrip().splitlines()
  table = (out / "acceptance.md").read_text().rstrip().splitlines()[2:]
  assert table[0].startswith("| section | item |") and len(table) > 20
  assert lines[-len(table):] == table
  body = "\n".join(table)
  for name in SECTIONS:
    assert f"| {name} |" in body
  assert "| FAIL |" not in body and "| run | reduced | PASS |" in body


def _ctx():
  return argparse.Namespace(big=False, gpu=False, interpret=True, reduced=True)


def test_a_broken_reference_fails_the_check(monkeypatch):
  from vesperjax.kernels import _era as era_mod
  good = era_mod.era_reference
  ok = ga.check_era(_ctx(), np.random.default_rng(0), ga.F32)[0]
  assert ok["passed"] is True and ok["error"] < 1e-5
  monkeypatch.setattr(era_mod, "era_reference", lambda x, g=0.1: 1.05 * good(x, g))
  bad = ga.check_era(_ctx(), np.random.default_rng(0), ga.F32)[0]
  assert bad["passed"] is False
  assert 0.04 < bad["errors"]["y"]["error"] < 0.06 and not bad["errors"]["y"]["passed"]
  monkeypatch.setattr(era_mod, "era_reference", lambda x, g=0.1: good(x, g) * np.nan)
  nan = ga.check_era(_ctx(), np.random.default_rng(0), ga.BF16)[0]
  assert nan["passed"] is False and nan["error"] is None  # NaN never passes


def test_rel_err():
  ref = np.arange(1, 5, dtype=np.float32)
  assert ga.rel_err(ref, ref) == 0.0
  assert ga.rel_err(ref * 1.01, ref) == pytest.approx(0.01, rel=1e-4)
  assert ga.rel_err(np.array([1.0, np.nan]), np.array([1.0, 2.0])) is None
  assert ga.rel_err(ref[:3], ref) is None  # shape mismatch never passes


def test_a_crashed_section_is_recorded_and_the_rest_still_run(tmp_path):
  proc, report = _run(tmp_path, "--only", "kernels,timing", "--inject-crash", "kernels")
  assert proc.returncode == 1
  sections = report["sections"]
  assert sections["kernels"]["status"] == "crashed (rc=3)"
  assert sections["timing"]["status"] == "ok" and sections["timing"]["rows"]
  assert report["failed"] == ["kernels"]
  assert "| kernels | (section) | FAIL | crashed (rc=3) |" in proc.stdout
  assert os.path.exists(tmp_path / "acceptance.md")


def test_prepared_plan_is_used_for_the_device_kind(tmp_path):
  key = "xlarge:b8:s2048:bfloat16:h200"
  (tmp_path / "plans.json").write_text(json.dumps({key: dict(total=123, fits=True, jax="x")}))
  row = dict(preset="xlarge", batch=8, seq_len=2048, dtype="bfloat16")
  ctx = argparse.Namespace(device={"kind": "NVIDIA H200"}, args=argparse.Namespace(
      deps=str(tmp_path)), reduced=False)
  got = ga.plan_figure(ctx, row, None)
  assert got["plan_bytes"] == 123 and got["plan_target"] == "h200" and got["plan_fits"]
  ctx.reduced, ctx.device = True, {"kind": "NVIDIA H100 80GB HBM3"}  # no h100 entry
  assert "plan_bytes" not in ga.plan_figure(ctx, row, None)
