"""`python -m vesperjax.benchmark`: both benchmarks end to end at toy size, the report's
summary and plots, and one-line errors."""
import json
import os

import numpy as np
import pytest

from vesperjax import benchmark
from vesperjax.bench.optimizers import format_table, summarize

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
  assert "best Velvet vs best AdamW" in out
  for name in ("loss_curves", "val_loss_vs_lr", "adaptive_scales", "grad_norm"):
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
          curves.update(entropy_scale=[1.2] * 20, perplexity_scale=[0.7] * 20)
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


def test_plot_command_redraws_a_report(capsys, tmp_path):
  path = tmp_path / "benchmark_report.json"
  path.write_text(json.dumps(fake_report()))
  code, out, err = run_main(capsys, "plot", "--report", str(path))
  assert code == 0, err
  assert len(out.strip().splitlines()) == 4
  assert all(os.path.getsize(p) > 1000 for p in out.split())


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
     "velvet, adamw"),
    (["plot", "--report", "/nonexistent.json"], "plot needs --report"),
])
def test_bad_input_is_one_error_line(capsys, args, message):
  code, out, err = run_main(capsys, *args)
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
  assert message in err
