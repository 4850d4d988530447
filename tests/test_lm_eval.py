"""lm-evaluation-harness on a `--format hf` export, offline: `python -m vesperjax.eval` and
lm-eval's own `lm_eval --model hf` run the local task in tests/lm_eval_tasks
(vesperjax_continuation: 20 three-way choices of a continuation of held-out prose), and
the acc and acc_norm they report equal those computed from vesperjax's own
log-probabilities (`load_pretrained` of the same folder).

The reference follows the documented meaning of a multiple_choice task, not lm-eval's
code: each choice is scored by the summed log-probability of the continuation
`target_delimiter + choice` (" " here) given the context, with nothing before the
context (the export's tokenizer adds no BOS); acc is the share of items whose highest
score is the gold choice, acc_norm the same with each score divided by the choice's
length in characters. The model is byte-level, so the context's and the continuation's
tokens are the bytes of each, the same whether the pair is encoded whole or apart.

Everything runs with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and an empty HF_HOME: the
task's items are read from the repository, nothing is downloaded.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import vesperjax as vj
from tests.test_export import one_error
from tests.test_export_hf import KINDS, save_run, vj_logits
from vesperjax import eval as ev
from vesperjax import export as ex

pytestmark = pytest.mark.skipif(
    bool(ev.missing_packages()),
    reason="needs lm-eval, torch and transformers: pip install 'vesperjax[eval]'")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(ROOT, "tests", "lm_eval_tasks")
TASK = "vesperjax_continuation"
DELIMITER = " "  # the task's target_delimiter
# |log-likelihood from PyTorch - vesperjax's| of a continuation of about 25 tokens, each
# fp32 (measured 4e-5; the log-likelihoods are about -210, choices apart by 0.05 or more)
TOL = 2e-4


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  run = save_run(tmp_path_factory.mktemp("run"), **KINDS["flylora"])
  out = str(tmp_path_factory.mktemp("hf") / "export")
  ex.export(run, out, format="hf")
  return out


@pytest.fixture(scope="module")
def items():
  with open(os.path.join(TASKS, "continuation.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(export, items):
  """[items, choices] log-likelihoods of each choice's continuation, from vesperjax."""
  model, tok = vj.load_pretrained(export)
  seqs, spans = [], []
  for item in items:
    context = tok.encode(item["context"])
    for choice in item["choices"]:
      continuation = tok.encode(DELIMITER + choice)
      assert tok.encode(item["context"] + DELIMITER + choice) == context + continuation
      seqs.append(context + continuation)
      spans.append((len(context), len(continuation)))
  tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
  for i, s in enumerate(seqs):  # right padding: causal, no position sees the padding
    tokens[i, :len(s)] = s
  logp = np.asarray(jax.nn.log_softmax(vj_logits(model, tokens), -1), np.float64)
  lls = [sum(logp[i, n + j - 1, seqs[i][n + j]] for j in range(m))  # logits at t: t + 1
         for i, (n, m) in enumerate(spans)]
  return np.array(lls).reshape(len(items), -1)


def accuracies(lls, items) -> dict:
  gold = np.array([item["gold"] for item in items])
  chars = np.array([[len(c) for c in item["choices"]] for item in items], np.float64)
  for scores, tol in ((lls, TOL), (lls / chars, TOL / chars.min())):
    top2 = np.sort(scores, 1)[:, -2:]  # each decision is clear of PyTorch's difference
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * tol
  return {"acc": float(np.mean(lls.argmax(1) == gold)),
          "acc_norm": float(np.mean((lls / chars).argmax(1) == gold))}


def offline_env(home, **more) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "PYTHONPATH")}
  env.update(HF_HOME=str(home / "hf-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2",
             **more)
  return env


def run(args, cwd, env):
  r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


def test_vesperjax_eval_reports_the_metrics_of_vesperjax_log_probs(
    export, items, reference, tmp_path):
  """Run from the checkout's root with it on PYTHONPATH, where its kernels/ folder
  would shadow the `kernels` package Transformers imports: the command steps aside."""
  out = tmp_path / "results.json"
  r = run(["-m", "vesperjax.eval", "--model", export, "--tasks", TASK, "--include-path",
           TASKS, "--device", "cpu", "--output", str(out), "--log-samples"],
          cwd=ROOT, env=offline_env(tmp_path, PYTHONPATH=ROOT))
  results = json.loads(out.read_text())
  assert results["config"]["model_args"] == {
      "pretrained": export, "trust_remote_code": True, "dtype": "float32",
      "max_length": 128}
  got = np.zeros_like(reference)
  for sample in results["samples"][TASK]:
    got[sample["doc_id"]] = [float(ll) for ll, _ in sample["filtered_resps"]]
  assert np.abs(got - reference).max() <= TOL
  want = accuracies(reference, items)
  row = results["results"][TASK]
  assert row["acc,none"] == pytest.approx(want["acc"], abs=1e-9)
  assert row["acc_norm,none"] == pytest.approx(want["acc_norm"], abs=1e-9)
  assert r.stdout.splitlines() == [
      f"{TASK}  20 docs, 0-shot  acc {want['acc']:.4f} ± {row['acc_stderr,none']:.4f}  "
      f"acc_norm {want['acc_norm']:.4f} ± {row['acc_norm_stderr,none']:.4f}"]


@pytest.mark.slow  # lm-eval start-up twice over; the command above covers the path
def test_lm_eval_command_on_the_export(export, items, reference, tmp_path):
  """lm-eval's own command line, as docs/export.md gives it (outside the source tree,
  as a user runs it), on the first 5 items."""
  limit = 5
  run(["-I", "-m", "lm_eval", "--model", "hf", "--model_args",
       f"pretrained={export},trust_remote_code=True", "--tasks", TASK, "--include_path",
       TASKS, "--device", "cpu", "--batch_size", "8", "--limit", str(limit),
       "--output_path", str(tmp_path / "out")], cwd=tmp_path, env=offline_env(tmp_path))
  (path,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
  with open(path) as f:
    row = json.load(f)["results"][TASK]
  want = accuracies(reference[:limit], items[:limit])
  assert row["acc,none"] == pytest.approx(want["acc"], abs=1e-9)
  assert row["acc_norm,none"] == pytest.approx(want["acc_norm"], abs=1e-9)


def test_bad_input_is_one_error_line(export, tmp_path, capsys, monkeypatch):
  main = lambda *a: ev.main(["eval", *a])
  assert "no such directory" in one_error(capsys, main(f"--model={tmp_path / 'x'}",
                                                       "--tasks=x"))
  plain = tmp_path / "plain"  # a vesperjax export without Transformers' files
  plain.mkdir()
  with open(os.path.join(export, "config.json")) as f:
    saved = json.load(f)
  del saved["auto_map"]
  (plain / "config.json").write_text(json.dumps(saved))
  assert "--format hf" in one_error(capsys, main(f"--model={plain}", "--tasks=x"))
  assert "--tasks is required" in one_error(capsys, main(f"--model={export}"))
  assert "--batch-size" in one_error(capsys, main(f"--model={export}", "--tasks=x",
                                                  "--batch-size=0"))
  assert "--output" in one_error(capsys, main(f"--model={export}", "--tasks=x",
                                              "--log-samples"))
  monkeypatch.setattr(sys, "path", list(sys.path))  # the command takes the root off it
  line = one_error(capsys, main(f"--model={export}", f"--tasks={TASK},no_such_task",
                                f"--include-path={TASKS}"))
  assert "unknown task no_such_task" in line and TASK + "," not in line


def test_without_lm_eval_the_error_names_the_extra(export, capsys, monkeypatch):
  find = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "lm_eval" else find(name, *a))
  line = one_error(capsys, ev.main(["eval", f"--model={export}", f"--tasks={TASK}"]))
  assert "needs lm-eval" in line and "pip install 'vesperjax[eval]'" in line
