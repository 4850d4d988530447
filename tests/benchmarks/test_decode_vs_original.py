"""benchmarks/decode_vs_original.py without torch or the original: argument checks (one
`error:` line, exit 2), the shape check, and the summary math and report on hand-made
rounds (medians and ratios computed by hand)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "decode_vs_original.py"
_spec = importlib.util.spec_from_file_location("decode_vs_original", SCRIPT)
dvo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvo)

# Our tiny preset at vocab 8192 and the original's (tests/benchmarks/test_vs_original.py's
# counts).
OURS = dict(vocab=8192, hidden=256, layers=6, heads=4, ffn=1024, lora_rank=16, experts=0,
            params=8_611_840)
ORIGINAL = dict(OURS, params=8_611_840 + 61_632)


def _checkout(tmp_path, with_generate=True):
  pkg = tmp_path / "checkout" / "python"
  (pkg / "vesper").mkdir(parents=True)
  (pkg / "train.py").write_text("")
  (pkg / "vesper" / "model.py").write_text("")
  if with_generate:
    (pkg / "generate.py").write_text("")
  return pkg.parent


@pytest.mark.parametrize("argv,needle", [
    ([], "--original"),
    (["--original", "/nonexistent/checkout"], "no original trainer there"),
    (["--original", "{bare}"], "no generate.py beside its train.py"),
    (["--original", "{fake}", "--tokens", "0"], "--tokens >= 1"),
    (["--original", "{fake}", "--rounds", "x"], "invalid int value"),
    (["--original", "{fake}", "--json", "/nonexistent/dir/r.json"], "does not exist")])
def test_bad_arguments_are_one_error_line_and_exit_2(argv, needle, tmp_path, capsys):
  fake = _checkout(tmp_path / "a")
  bare = _checkout(tmp_path / "b", with_generate=False)
  argv = [a.format(fake=fake, bare=bare) for a in argv]
  assert dvo.main(argv) == 2
  lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


def test_defaults_are_the_issue_setting(tmp_path):
  args = dvo.parse_args(["--original", str(_checkout(tmp_path))])
  assert (args.tokens, args.rounds, args.repeats) == (256, 3, 3)
  assert dvo.PROMPT_LEN == 16
  # The original generate.py's argparse defaults.
  assert dvo.SAMPLING == dict(temperature=0.8, top_k=50, top_p=0.9,
                              repetition_penalty=1.1)


def test_check_shapes():
  assert dvo.check_shapes(ORIGINAL, OURS) == 61_632
  with pytest.raises(dvo.vs.Refused, match="layers: original 8, vesperjax 6"):
    dvo.check_shapes(dict(ORIGINAL, layers=8), OURS)
  with pytest.raises(dvo.vs.Refused, match="parameter counts differ by 61,633"):
    dvo.check_shapes(dict(ORIGINAL, params=ORIGINAL["params"] + 1), OURS)


def _rounds():
  rates = [(30.0, 300.0, 280.0), (34.0, 340.0, 300.0), (32.0, 320.0, 290.0)]
  return [dict(round=i, order=["original", "vesperjax"] if i % 2 else
               ["vesperjax", "original"],
               tokens_per_s=dict(original=o, loop=lp, streaming=st))
          for i, (o, lp, st) in enumerate(rates, start=1)]


def test_round_rates_and_summary_by_hand():
  r = dvo.round_rates(dict(tokens_per_s=31.5),
                      dict(loop_tokens_per_s=310.0, streaming_tokens_per_s=250.0))
  assert r == dict(original=31.5, loop=310.0, streaming=250.0)
  s = dvo.summarize(_rounds())
  assert s["median_tokens_per_s"] == dict(original=32.0, loop=320.0, streaming=290.0)
  assert s["loop_over_original"] == pytest.approx(10.0)
  assert s["streaming_over_original"] == pytest.approx(290 / 32)
  assert s["streaming_over_loop"] == pytest.approx(290 / 320)


def test_format_report_says_when_where_and_how():
  report = dict(
      date="2026-12-01 22:00 UTC", command="python benchmarks/decode_vs_original.py "
      "--original X", param_difference=61_632,
      machine=dict(cpu_model="AMD EPYC", cpu_count=2, affinity=2, platform="Linux",
                   loadavg_start=[0.1, 0.1, 0.1], loadavg_end=[1.0, 0.5, 0.2]),
      versions=dict(torch="2.13.0+cpu", torch_threads=2, jax="0.10.2",
                    vesperjax_git="abc1234", original_git=None, original_path="X/python"),
      setting=dict(tokens=256, repeats=3), rounds=_rounds())
  report["summary"] = dvo.summarize(report["rounds"])
  text = dvo.format_report(report)
  for needle in ("date: 2026-12-01 22:00 UTC", "machine: AMD EPYC, 2 logical CPUs",
                 "command: python benchmarks/decode_vs_original.py --original X",
                 "torch 2.13.0+cpu (2 threads), jax 0.10.2",
                 "original (not a git checkout)",
                 "batch 1, prompt 16, 256 new tokens", "repetition penalty 1.1",
                 "61,632 more"):
    assert needle in text, needle
  rows = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit()]
  assert rows[1] == ["2", "vesperjax", "34.0", "340.0", "300.0"]
  assert ("median over 3 round(s): original 32.0 tokens/s; vesperjax compiled loop 320.0 "
          "(10.00x the original), streaming 290.0 (9.06x; 0.91x our loop)") in text


def test_prompt_ids_fake_the_original_tokenizer_interface():
  tok = dvo._PromptIds(range(3))
  assert tok.encode("ignored").ids == [0, 1, 2]
  assert tok.token_to_id("</s>") is None and tok.decode([5, 6]) == [5, 6]
