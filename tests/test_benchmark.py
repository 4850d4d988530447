"""`python -m vesperjax.benchmark`: both benchmarks end to end at toy size, the report's
summary and plots, and one-line errors."""
import gzip
import json
import math
import os

import numpy as np
import pytest

from vesperjax import benchmark
from vesperjax.bench.optimizers import clip_exits, summarize
from vesperjax.bench.tables import format_table, markdown_table

TOY = ["--config", "experiments/tiny.py", "--config.model.hidden_size=32",
       "--config.model.num_layers=1", "--config.model.num_heads=2",
       "--config.model.ffn_size=64", "--config.model.lora_rank=4",
       "--config.model.lora_topk=2", "--config.data.seq_len=16",
       "--config.train.batch_size=8", "--config.train.fused_loss=False"]


def run_main(capsys, *args):
  code = benchmark.main(["benchmark", *args])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "text.txt"
  rng = np.random.RandomState(0)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "value", "(x)", ":"]
  lines = [" ".join(rng.choice(words, 12)) for _ in range(1500)]
  path.write_text("\n\n".join(lines))
  return str(path)


def test_throughput_prints_one_json_line(capsys):
  code, out, err = run_main(capsys, "throughput", *TOY, "--config.model.vocab_size=128",
                            "--steps", "2", "--warmup", "0", "--seq-len", "16")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert len(lines) == 1
  r = json.loads(lines[0])
  for key in ("step_s_median", "tokens_per_s", "compile_s", "peak_mem_bytes", "mfu",
              "peak_mem_source"):
    assert key in r
  assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0
  assert r["tokens_per_step"] == 8 * 16 and r["vocab"] == 128
  assert r["mfu"] is None  # CPU: no known peak
  assert "rss" in r["peak_mem_source"]
  assert np.isfinite(r["final_loss"])
  assert len(r["matmul_gflops_before_after"]) == 2
  assert all(x > 0 for x in r["matmul_gflops_before_after"])


@pytest.mark.slow
def test_optimizers_end_to_end(capsys, tmp_path, corpus):
  work = str(tmp_path / "bench")
  code, out, err = run_main(
      capsys, "optimizers", *TOY, "--config.data.tokenizer=byte",
      f"--config.data.dataset={corpus}", "--config.data.val_percent=20",
      "--config.train.eval_every=2", "--config.train.eval_batches=2",
      "--config.optim.warmup_steps=1", "--workdir", work, "--seeds", "2", "--lrs",
      "1e-3,3e-3", "--steps", "3")
  assert code == 0, err
  report = json.load(open(os.path.join(work, "benchmark_report.json")))
  assert len(report["runs"]) == 2 * 2 * 2  # optimizers x lrs x seeds
  for r in report["runs"]:
    assert len(r["curves"]["loss"]) == 3
    assert [s for s, _ in r["evals"]] == [0, 2, 3]
    assert np.isfinite(r["final_val_loss"])
  velvet = [r for r in report["runs"] if r["optimizer"] == "velvet"]
  adamw = [r for r in report["runs"] if r["optimizer"] == "adamw"]
  assert "entropy_scale" in velvet[0]["curves"] and "entropy_scale" not in adamw[0]["curves"]
  # same init and batches: identical validation loss before the first step
  assert len({r["evals"][0][1] for r in report["runs"] if r["seed"] == 0}) == 1
  assert "velvet_vs_adamw_best_val_pct" in report["summary"]
  assert "best velvet vs best adamw" in out
  for name in ("loss_curves", "val_loss_vs_lr", "adaptive_scales", "grad_norm",
               "rules_vs_loss"):
    assert os.path.getsize(os.path.join(work, "plots", f"{name}.png")) > 1000


def fake_report():
  rng = np.random.RandomState(0)
  runs = []
  for name in ("velvet", "adamw"):
    for lr in (1e-3, 2e-3):
      for seed in range(2):
        loss = list(5 - np.linspace(0, 1, 20) + 0.05 * rng.rand(20))
        curves = {"loss": loss, "grad_norm": list(1 + rng.rand(20)),
                  "learning_rate": [lr] * 20}
        if name == "velvet":
          curves.update(entropy_scale=[1.2] * 20, perplexity_scale=[0.7] * 20,
                        b1=[0.63] * 20)
        val = 4.0 + (0.1 if name == "adamw" else 0.0) + lr * 10 + 0.01 * seed
        runs.append(dict(optimizer=name, lr=lr, seed=seed, curves=curves,
                         evals=[(0, 5.5), (20, val)], final_val_loss=val,
                         final_train_loss=loss[-1], step_s=0.1))
  report = dict(optimizers=["velvet", "adamw"], lrs=[1e-3, 2e-3], steps=20, seeds=2,
                runs=runs)
  report["summary"] = summarize(report)
  return report


def test_summary_picks_each_optimizers_best_lr():
  s = fake_report()["summary"]
  assert s["best"]["velvet"]["lr"] == 1e-3 and s["best"]["adamw"]["lr"] == 1e-3
  want = 100 * (4.015 - 4.115) / 4.115
  assert s["velvet_vs_adamw_best_val_pct"] == pytest.approx(want)
  assert s["gap_exceeds_seed_std"]
  table = format_table(s)
  assert table.count("*") >= 2 and "velvet" in table and "adamw" in table


def test_markdown_table_has_one_row_per_arm_at_its_best_lr():
  table = markdown_table(fake_report()["summary"]).splitlines()
  assert len(table) == 2 + 2
  # velvet: best LR 1e-3, seeds 4.01 and 4.02 -> 4.015 +- 0.005, vs adamw 4.115
  assert table[2] == ("| velvet | 0.001 (grid edge) | 2 | 4.015 ± 0.005 | "
                      f"{100 * (4.015 - 4.115) / 4.115:+.2f}% | yes |")
  assert table[3].startswith("| adamw | 0.001 (grid edge) | 2 | 4.115 ± 0.005 |  |")


def test_summary_compares_every_arm_with_adamw_and_flags_unbracketed_optima():
  report = fake_report()
  for r in [r for r in report["runs"] if r["optimizer"] == "velvet"]:
    report["runs"].append(dict(r, optimizer="velvet-entropy",
                               final_val_loss=r["final_val_loss"] - 0.2 * r["lr"] * 1e3))
  report["optimizers"].append("velvet-entropy")
  s = summarize(report)
  # velvet-entropy: 4.0 + 10 lr - 200 lr (+0.01 seed) is lowest at the larger LR
  assert s["best"]["velvet-entropy"]["lr"] == 2e-3
  a = s["best"]["adamw"]["val_mean"]
  assert s["vs_adamw_pct"]["velvet-entropy"] == pytest.approx(
      100 * (4.0 - 0.38 + 0.005 - a) / a)
  assert s["bracketed"] == {"velvet": False, "adamw": False, "velvet-entropy": False}
  assert "optimum not bracketed" in format_table(s)
  assert set(s["clip_exits"]) == {"velvet", "velvet-entropy"}  # the arms with scales


def test_clip_exits_reads_where_most_steps_leave_or_reach_a_clip():
  # entropy scale 1.3 until step 30, then 1.0; perplexity scale 0.7 until 50, 1.3 from 80
  es = [1.3] * 30 + [1.0] * 70
  ps = [0.7] * 50 + [1.0] * 30 + [1.3] * 20
  loss = list(np.linspace(6, 3, 100))
  run = dict(curves=dict(entropy_scale=es, perplexity_scale=ps, loss=loss))
  e = clip_exits([run], window=1)
  assert e["entropy_scale_leaves_max"] == dict(
      step=31, loss=pytest.approx(loss[30]), seeds=1, of=1, share_at_clip=0.3,
      share_at_clip_last_fifth=0.0)
  assert e["entropy_scale_reaches_min"]["step"] is None
  assert e["perplexity_scale_leaves_min"]["step"] == 51
  assert e["perplexity_scale_reaches_max"]["step"] == 81
  assert e["perplexity_scale_reaches_max"]["share_at_clip_last_fifth"] == 1.0
  assert "b1_reaches_cap" not in e  # no b1 curve in this run
  # over 4 steps: at step 33 only 1 of the last 4 is at 1.3, the first time under half;
  # the loss there is the 4-step moving average
  e4 = clip_exits([run, run], window=4)["entropy_scale_leaves_max"]
  assert e4["step"] == 33 and e4["seeds"] == 2
  assert e4["loss"] == pytest.approx(np.mean(loss[29:33]))
  assert clip_exits([run], window=4)["perplexity_scale_reaches_max"]["step"] == 82
  run["curves"]["b1"] = [0.63] * 90 + [0.999] * 10
  b1 = clip_exits([run], window=1)["b1_reaches_cap"]
  assert (b1["step"], b1["share_at_clip"], b1["share_at_clip_last_fifth"]) == (91, 0.1, 0.5)
  # a rule that is off (its scale always 1) is left out
  run["curves"]["perplexity_scale"] = [1.0] * 100
  assert not any(k.startswith("perplexity") for k in clip_exits([run], window=1))


def _two_step_arms(corpus, work):
  """`benchmark optimizers` arguments for two-step runs at one LR and seed."""
  return ["optimizers", *TOY, "--config.data.tokenizer=byte",
          f"--config.data.dataset={corpus}", "--config.data.val_percent=20",
          "--config.train.eval_every=2", "--config.train.eval_batches=1",
          "--config.optim.warmup_steps=1", "--workdir", work, "--seeds", "1",
          "--lrs", "2e-3", "--steps", "2"]


def test_arms_run_their_rules_and_a_rerun_keeps_finished_runs(capsys, tmp_path, corpus):
  work = str(tmp_path / "arms")
  common = _two_step_arms(corpus, work)
  code, _, err = run_main(capsys, *common, "--optimizers",
                          "adamw-clipped-b1,velvet-entropy")
  assert code == 0, err
  path = os.path.join(work, "benchmark_report.json")
  first = json.load(open(path))
  assert first["arms"]["adamw-clipped-b1"] == {"name": "adamw", "b1": pytest.approx(0.63)}
  runs = {r["optimizer"]: r for r in first["runs"]}
  # the entropy-only ablation keeps beta1 at 0.9: its perplexity scale is a neutral 1
  assert runs["velvet-entropy"]["curves"]["perplexity_scale"] == [1.0, 1.0]
  assert runs["velvet-entropy"]["curves"]["b1"] == pytest.approx([0.9, 0.9])
  code, out, err = run_main(capsys, *common, "--optimizers", "velvet-perplexity")
  assert code == 0, err
  second = json.load(open(path))
  assert second["optimizers"] == ["adamw-clipped-b1", "velvet-entropy",
                                  "velvet-perplexity"]
  kept = {r["optimizer"]: r for r in second["runs"]}
  assert kept["velvet-entropy"] == runs["velvet-entropy"]  # not rerun
  assert second["started"] == first["started"]
  assert kept["velvet-perplexity"]["curves"]["entropy_scale"] == [1.0, 1.0]
  assert "best velvet-entropy vs best adamw" not in out  # no adamw arm: no comparison
  # another config in the same workdir is refused, the report left as it was
  code, _, err = run_main(capsys, *common, "--config.optim.b2=0.99")
  assert code == 2 and "another config" in err
  assert json.load(open(path)) == second


def test_every_write_of_a_growing_report_keeps_the_earlier_runs(capsys, tmp_path, corpus,
                                                                monkeypatch):
  """A rerun that lists an arm already run writes the report after each new run; each
  write must still hold that arm's runs, or a sweep stopped before it reaches the arm
  would lose them from the file it grows."""
  from vesperjax.bench import optimizers as bench_optimizers
  work = str(tmp_path / "grow")
  common = _two_step_arms(corpus, work)
  assert run_main(capsys, *common, "--optimizers", "adamw")[0] == 0
  written, write = [], bench_optimizers.write_report
  monkeypatch.setattr(bench_optimizers, "write_report", lambda path, report: (
      written.append(sorted({r["optimizer"] for r in report["runs"]})), write(path, report)))
  code, _, err = run_main(capsys, *common, "--optimizers", "velvet-entropy,adamw")
  assert code == 0, err
  assert written and all(w == ["adamw", "velvet-entropy"] for w in written), written


def test_protocol_brackets_each_optimum_then_adds_seeds_at_the_best_lrs(
    capsys, tmp_path, corpus, monkeypatch):
  """--bracket grows the grid past an edge optimum; --top-lrs runs the other seeds at
  the first seed's best LRs only. Training is replaced by a loss that depends on the
  peak LR alone (best at 8e-3), so the protocol's choices can be checked by hand."""
  from vesperjax.bench import optimizers as bench_optimizers

  def fake_run(steps, seed_key, batches, eval_data, eval_every, schedule):
    lr = max(float(schedule(i)) for i in range(len(batches)))
    val = 4.0 + (math.log(lr) - math.log(8e-3)) ** 2 + 0.001 * len(ran)
    ran.append(lr)
    curves = {"loss": [val] * len(batches), "learning_rate": [lr] * len(batches)}
    return curves, [(0, 5.0), (len(batches), val)], [0.1, 0.1]

  ran = []
  monkeypatch.setattr(bench_optimizers, "_run_one", fake_run)
  work = str(tmp_path / "protocol")
  code, out, err = run_main(
      capsys, "optimizers", *TOY, "--config.data.tokenizer=byte",
      f"--config.data.dataset={corpus}", "--config.data.val_percent=20",
      "--config.optim.warmup_steps=1", "--workdir", work, "--seeds", "3",
      "--lrs", "1e-3,2e-3", "--steps", "2", "--optimizers", "adamw",
      "--top-lrs", "2", "--bracket", "4")
  assert code == 0, err
  # seed 0: 1e-3, 2e-3, then 4e-3, 8e-3 (edge each time), 1.6e-2 brackets 8e-3
  assert ran[:5] == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
  report = json.load(open(os.path.join(work, "benchmark_report.json")))
  seeds = {}
  for r in report["runs"]:
    seeds.setdefault(round(r["lr"], 6), []).append(r["seed"])
  # the two best first-seed LRs (8e-3, then 4e-3 by the fake's tie-break) get 3 seeds
  assert sorted(seeds[0.008]) == [0, 1, 2] and sorted(seeds[0.004]) == [0, 1, 2]
  assert all(s == [0] for lr, s in seeds.items() if lr not in (0.008, 0.004))
  assert len(ran) == 5 + 4
  assert all(r["date"] and "commit" in r for r in report["runs"])  # provenance per run
  summary = report["summary"]
  assert summary["best"]["adamw"]["lr"] == pytest.approx(8e-3)
  assert summary["best"]["adamw"]["seeds"] == 3 and summary["bracketed"]["adamw"]


def test_a_gzipped_report_is_read_and_grown_in_place(tmp_path):
  from vesperjax.bench import optimizers as bench_optimizers
  from vesperjax.run_config import RunConfig
  work = tmp_path / "study"
  work.mkdir()
  run = RunConfig()
  report = dict(fake_report(), config=run.to_dict(), started="then")
  with gzip.open(work / "benchmark_report.json.gz", "wt") as f:
    json.dump(report, f)
  path = bench_optimizers.report_path(str(work))
  assert path.endswith(".json.gz")
  assert bench_optimizers.read_report(path) == json.loads(json.dumps(report))
  bench_optimizers.write_report(path, dict(report, started="now"))
  with gzip.open(path, "rt") as f:  # rewritten gzipped, in place
    assert json.load(f)["started"] == "now"
  assert not (work / "benchmark_report.json").exists()


@pytest.mark.parametrize("gz", [False, True])
def test_plot_command_redraws_a_report(capsys, tmp_path, gz):
  path = tmp_path / ("benchmark_report.json" + (".gz" if gz else ""))
  text = json.dumps(fake_report())
  if gz:
    with gzip.open(path, "wt") as f:
      f.write(text)
  else:
    path.write_text(text)
  code, out, err = run_main(capsys, "plot", "--report", str(path))
  assert code == 0, err
  assert len(out.strip().splitlines()) == 5
  assert all(os.path.getsize(p) > 1000 for p in out.split())
  code, out, err = run_main(capsys, "table", "--report", str(path))
  assert code == 0, err
  assert out.strip() == markdown_table(summarize(fake_report()))
  code, out, err = run_main(capsys, "table", "--report", str(path), "--seed", "1")
  assert code == 0, err
  # seed 1: velvet 4.01 + 1e-3 * 10 = 4.02 at 1e-3, 4.03 at 2e-3 (fake_report's values)
  assert out.strip().splitlines()[2] == "| velvet | **4.020** | 4.030 |"


@pytest.mark.parametrize("args,message", [
    ([], "expected a command"),
    (["train"], "expected a command"),
    (["throughput"], "--config FILE is required"),
    (["throughput", "--config", "experiments/nope.py"], "cannot load --config"),
    (["throughput", "--config", "experiments/tiny.py", "--config.train.nope=1"],
     "unknown config key"),
    (["optimizers", "--config", "experiments/tiny.py", "--lrs", "1e-3,abc"],
     "not a number"),
    (["optimizers", "--config", "experiments/tiny.py", "--optimizers", "sgd"],
     "velvet, adamw, adamw-clipped-b1, velvet-entropy, velvet-perplexity, "
     "velvet-rules-off"),
    (["optimizers", "--config", "experiments/tiny.py", "--optimizers", "adamw,adamw"],
     "choose distinct arms"),
    (["plot", "--report", "/nonexistent.json"], "plot needs --report"),
])
def test_bad_input_is_one_error_line(capsys, args, message):
  code, out, err = run_main(capsys, *args)
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
  assert message in err


@pytest.mark.parametrize("name,content", [("r.json", b"{not json"),
                                          ("r.json.gz", b"not gzip at all")])
def test_plot_of_a_damaged_report_is_one_error_line(capsys, tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  code, _, err = run_main(capsys, "plot", "--report", str(path))
  assert code == 2 and err.startswith("error: ") and "not a readable JSON report" in err
  assert len(err.strip().splitlines()) == 1
