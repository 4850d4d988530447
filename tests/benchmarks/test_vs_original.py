"""benchmarks/vs_original.py without torch or the original: its argument checks (one
`error:` line, exit 2), the shape check, and the report's ratio math and formatting on
hand-made results (figures of issue #17's manual rounds, ratios computed by hand)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "vs_original.py"
_spec = importlib.util.spec_from_file_location("vs_original", SCRIPT)
vs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs)

TINY = dict(vocab=8192, hidden=256, layers=6, heads=4, ffn=1024, lora_rank=16,
            lora_alpha=32.0, lora_sparsity=0.25, era_gamma=0.1, experts=0, top_k=0,
            aux_weight=0.0, norm_eps=1e-6, rope_theta=10000.0, dtype="float32",
            optimizer="velvet", max_grad_norm=1.0, params=8_611_840)


def _timing(median, low, yardstick=(150.0, 160.0)):
  return dict(median_s=median, min_s=low, max_s=median + 0.1, yardstick_gflops=list(yardstick))


def _rounds():
  """Issue #17's four dense rounds (original, vesperjax: median, min) + two MoE rounds."""
  dense = [((1.07, 0.98), (1.26, 1.05)), ((0.95, 0.79), (1.20, 1.12)),
           ((1.07, 0.91), (1.31, 1.08)), ((1.15, 0.91), (1.26, 1.12))]
  moe = [((1.70, 1.60), (2.33, 2.20)), ((1.80, 1.65), (2.43, 2.25))]
  out = []
  for i, (d, m) in enumerate(zip(dense, moe + [None, None]), start=1):
    order = ["original", "vesperjax"] if i % 2 else ["vesperjax", "original"]
    for model, pair in (("dense", d), ("moe", m)):
      if pair:
        out.append(dict(round=i, model=model, order=order, original=_timing(*pair[0]),
                        vesperjax=_timing(*pair[1])))
  return out


def _error_lines(capsys):
  return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("argv, needle", [
    ([], "--original"),
    (["--original", "/nonexistent/checkout"], "no original trainer there"),
    (["--original", "{empty}"], "no original trainer there"),
    (["--original", "{fake}", "--rounds", "0"], "--rounds >= 1"),
    (["--original", "{fake}", "--steps", "0"], "--steps >= 1"),
    (["--original", "{fake}", "--models", "dense,sparse"], "choose from dense, moe"),
    (["--original", "{fake}", "--json", "/nonexistent/dir/r.json"], "does not exist"),
    (["--original", "{fake}", "--rounds", "x"], "invalid int value"),
])
def test_bad_arguments_are_one_error_line_and_exit_2(argv, needle, tmp_path, capsys,
                                                     fake_original):
  (tmp_path / "empty").mkdir()
  argv = [a.format(fake=fake_original, empty=tmp_path / "empty") for a in argv]
  assert vs.main(argv) == 2
  lines = _error_lines(capsys)
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_missing_path_as_a_process(tmp_path):
  proc = subprocess.run([sys.executable, str(SCRIPT), "--original", str(tmp_path / "no")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      f"error: --original {tmp_path / 'no'}: no original trainer there (expected "
      "python/train.py and python/vesper/model.py of a thevesperhouse-hub/VelvetOptimizer "
      "checkout)"]
  assert proc.stdout == ""


@pytest.mark.parametrize("under", ["", "python"])
def test_original_package_accepts_the_checkout_or_its_python_folder(tmp_path, under):
  pkg = tmp_path / "python"
  (pkg / "vesper").mkdir(parents=True)
  (pkg / "train.py").write_text("")
  (pkg / "vesper" / "model.py").write_text("")
  assert vs.original_package(str(tmp_path / under)) == pkg.resolve()
  args = vs.parse_args(["--original", str(tmp_path / under), "--models", " moe ,dense"])
  assert args.models == ["moe", "dense"] and (args.rounds, args.steps) == (4, 12)


def test_expected_param_difference_by_hand():
  # Per FlyLoRA linear the original also trains a [256, 16] down-projection, its 16
  # biases and 1024 up-projection biases: 5136; two per FFN, 6 layers.
  assert vs.expected_param_difference(TINY) == 6 * 2 * 5136 == 61_632
  # tiny-moe: 4 experts' FFNs, plus each layer's 4 router biases.
  assert vs.expected_param_difference(dict(TINY, experts=4, top_k=2)) == 246_552


def test_check_shapes():
  original = dict(TINY, params=TINY["params"] + 61_632)  # the counts from a real build
  assert vs.check_shapes(original, TINY) == 61_632
  with pytest.raises(vs.Refused, match="ffn: original 2048, vesperjax 1024"):
    vs.check_shapes(dict(original, ffn=2048), TINY)
  with pytest.raises(vs.Refused, match="experts: original 4, vesperjax 0"):
    vs.check_shapes(dict(original, experts=4), TINY)
  with pytest.raises(vs.Refused, match="differ by 61,633, not the 61,632"):
    vs.check_shapes(dict(original, params=original["params"] + 1), TINY)


def test_summary_ratios_by_hand():
  s = vs.summarize(_rounds())
  d, m = s["dense"], s["moe"]
  assert d["rounds"] == 4 and m["rounds"] == 2
  # dense medians: original 0.95 1.07 1.07 1.15 -> 1.07; ours 1.20 1.26 1.26 1.31 -> 1.26
  assert d["original_median_s"] == pytest.approx(1.07)
  assert d["vesperjax_median_s"] == pytest.approx(1.26)
  assert d["ratio"] == pytest.approx(0.849206, abs=1e-6)
  assert d["round_ratios"] == pytest.approx([0.849206, 0.791667, 0.816794, 0.912698],
                                            abs=1e-6)
  assert (d["original_min_s"], d["vesperjax_min_s"]) == (0.79, 1.05)
  assert d["ratio_of_mins"] == pytest.approx(0.752381, abs=1e-6)
  # moe, two rounds: medians are the means 1.75 and 2.38
  assert m["ratio"] == pytest.approx(1.75 / 2.38) == pytest.approx(0.735294, abs=1e-6)
  assert m["ratio_of_mins"] == pytest.approx(1.60 / 2.20)


def test_formatting():
  rounds = _rounds()
  table = vs.format_rounds(rounds).splitlines()
  assert len(table) == 1 + 6
  assert table[1].split() == ["1", "dense", "original", "1.070", "s", "(0.980)", "1.260",
                              "s", "(1.050)", "0.85x", "150/160", "|", "150/160"]
  assert table[3].split()[:3] == ["2", "dense", "vesperjax"]
  assert "0.79x" in table[3] and "0.73x" in table[2]
  summary = vs.format_summary(vs.summarize(rounds))
  assert "dense: vesperjax at 0.85x the original over 4 round(s)" in summary
  assert "original 1.070 s, vesperjax 1.260 s; per round 0.85 0.79 0.82 0.91" in summary
  assert "fastest steps 0.790 s vs 1.050 s, 0.75x" in summary
  assert "moe: vesperjax at 0.74x the original over 2 round(s)" in summary
  assert summary.endswith("above 1 means vesperjax is faster.")


def test_format_report_says_when_where_and_how():
  rounds = _rounds()
  shapes = {"dense": dict(original=dict(TINY, params=8_673_472), vesperjax=TINY,
                          param_difference=61_632)}
  report = dict(
      date="2026-12-01 18:00 UTC", command="python benchmarks/vs_original.py --original X",
      machine=dict(cpu_model="AMD EPYC", cpu_count=2, affinity=2, platform="Linux",
                   loadavg_start=[0.1, 0.1, 0.1], loadavg_end=[2.0, 1.0, 0.5]),
      versions=dict(torch="2.13.0+cpu", torch_threads=2, jax="0.10.2",
                    vesperjax_git="abc1234", original_git=None, original_path="X/python"),
      setting=dict(vocab=8192, batch=8, seq_len=256, dtype="float32", optimizer="velvet",
                   steps=12, warmup=2, torch_compile=False),
      shapes=shapes, rounds=rounds, summary=vs.summarize(rounds))
  text = vs.format_report(report)
  for needle in ("date: 2026-12-01 18:00 UTC", "machine: AMD EPYC, 2 logical CPUs",
                 "command: python benchmarks/vs_original.py --original X",
                 "torch 2.13.0+cpu (2 threads), jax 0.10.2", "original (not a git checkout)",
                 "batch 8 x seq 256", "original eager", "measured in torch",
                 "8,673,472", "the original trains 61,632 more", "0.85x"):
    assert needle in text, needle
