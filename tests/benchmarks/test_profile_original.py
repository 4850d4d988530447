"""benchmarks/profile_original.py without torch or the original: its op grouping (aten
ops and XLA op kinds, assigned by hand), the grouped sums and the side-by-side table on
hand-made profiles, and its argument checks (one `error:` line, exit 2)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "profile_original", ROOT / "benchmarks" / "profile_original.py")
po = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(po)
MATMUL, INDEXING, OTHER = po.GROUPS


@pytest.mark.parametrize("op, side, group", [
    ("aten::mm", "original", MATMUL), ("aten::addmm", "original", MATMUL),
    ("aten::bmm", "original", MATMUL), ("aten::index_add_", "original", INDEXING),
    ("aten::nonzero", "original", INDEXING), ("aten::topk", "original", INDEXING),
    ("aten::index", "original", INDEXING), ("aten::mul", "original", OTHER),
    ("aten::_log_softmax", "original", OTHER), ("aten::index_fill_", "original", OTHER),
    ("ynn_fusion", "vesperjax", MATMUL), ("dot_general", "vesperjax", MATMUL),
    ("dot", "vesperjax", MATMUL), ("gather_bitcast_fusion", "vesperjax", INDEXING),
    ("wrapped_scatter", "vesperjax", INDEXING), ("sort", "vesperjax", INDEXING),
    ("multiply_add_fusion", "vesperjax", OTHER), ("while", "vesperjax", OTHER),
    ("bitcast_dynamic-update-slice_fusion", "vesperjax", OTHER),
])
def test_groups_by_hand(op, side, group):
  assert po.group_of(op, side) == group


def _profile(ms, wall, cpu):
  return dict(wall_s=wall, cpu_s_per_step=cpu, ms=ms, count={k: 2.0 for k in ms})


def test_grouped_sums_and_table():
  original = _profile({"aten::mm": 600.0, "aten::addmm": 200.0, "aten::index": 5.0,
                       "aten::mul": 80.0, "aten::add": 20.0}, wall=1.0, cpu=1.9)
  original["phases"] = {"forward": 400.0, "backward": 560.0, "optimizer": 40.0}
  ours = _profile({"ynn_fusion": 700.0, "dot_general": 50.0, "gather_fusion": 30.0,
                   "multiply_fusion": 150.0}, wall=0.9, cpu=1.8)
  assert po.grouped_ms(original["ms"], "original") == {MATMUL: 800.0, INDEXING: 5.0,
                                                       OTHER: 100.0}
  assert po.grouped_ms(ours["ms"], "vesperjax") == {MATMUL: 750.0, INDEXING: 30.0,
                                                    OTHER: 150.0}
  lines = po.format_model("dense", dict(original=original, vesperjax=ours), top=2
                          ).splitlines()
  assert "| threads busy (process CPU / wall) | 1.9 | 2.0 |" in lines
  assert f"| {MATMUL} (ms) | 800 | 750 |" in lines
  assert "| op time summed (ms) | 905 | 930 |" in lines
  assert "the original by phase: forward 400 ms, backward 560 ms, optimizer 40 ms" in lines
  top = lines[lines.index("vesperjax, top 2 ops: ms/step, calls/step, op") + 1:]
  assert [ln.split()[-2] for ln in top] == ["ynn_fusion", "multiply_fusion"]


@pytest.mark.parametrize("argv, needle", [
    (["--original", "/nonexistent"], "no original trainer there"),
    (["--original", "{fake}", "--models", "moe,sparse"], "choose from dense, moe"),
    (["--original", "{fake}", "--steps", "0"], "--steps >= 1"),
    (["--original", "{fake}", "--json", "/nonexistent/dir/p.json"], "does not exist"),
])
def test_bad_arguments_are_one_error_line(argv, needle, capsys, fake_original):
  assert po.main([a.format(fake=fake_original) for a in argv]) == 2
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
