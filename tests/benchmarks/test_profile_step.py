"""benchmarks/profile_step.py's aggregation of trace events, on hand-made events."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import profile_step  # noqa: E402


def test_op_times_groups_by_kind_per_step_and_skips_wrappers():
  events = [
      {"ph": "X", "name": "ynn_fusion.3", "dur": 4000},
      {"ph": "X", "name": "ynn_fusion.17", "dur": 2000},
      {"ph": "X", "name": "dot_general", "dur": 1000},
      {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},  # a wrapper
      {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},
      {"ph": "i", "name": "ynn_fusion.3", "dur": 5000},  # not a complete event
  ]
  ms, count = profile_step.op_times(events, steps=2)
  assert ms == {"ynn_fusion": 3.0, "dot_general": 0.5}
  assert count == {"ynn_fusion": 1.0, "dot_general": 0.5}
  table = profile_step.format_table(ms, count, wall_s=0.004, top=1).splitlines()
  assert table[0] == "step wall time 4 ms; op time summed 4 ms"
  assert table[2].split() == ["3.0", "1", "ynn_fusion"] and len(table) == 3
