"""Calibration of the metacognition head against the max-softmax probability.

Trains the same tiny run (experiments/tiny.py, same data, seed and steps) three ways -
without the head, with it (meta_trunk_grad off) and with it training the trunk too - and
evaluates each on the validation split: eval loss, top-1 accuracy, and the expected
calibration error (15 bins) and AUROC of two predictors of top-1 correctness, the max
softmax probability and the head's P(correct), plus the AUROC of the head's P(end)
for the end-of-document event. Prints a markdown table (docs/metacognition.md) and
one JSON line per variant.

  python benchmarks/meta_head_calibration.py [--dataset FILE] [--steps 600]
      [--eval-batches 32] [--workdir DIR] [--variants none,head,head+trunk]

Without --dataset the text is a few stdlib modules (as the tests use). --workdir keeps
the runs (default: a temporary directory).
"""
import argparse
import importlib.util
import json
import os
import tempfile

from vesperjax.host_memory import keep_freed_memory

keep_freed_memory()  # as under `python -m vesperjax.*` (see vesperjax/host_memory.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from vesperjax.training import calibration  # noqa: E402
from vesperjax import data as vdata  # noqa: E402
from vesperjax import sharding  # noqa: E402
from vesperjax.training.train_step import meta_outputs, token_outputs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"none": dict(meta_head=False),
            "head": dict(meta_head=True, meta_trunk_grad=False),
            "head+trunk": dict(meta_head=True, meta_trunk_grad=True)}


def stdlib_corpus(path):
  import argparse as a, email, json as js, logging, pathlib  # noqa: E401
  text = "\n\n".join(open(m.__file__).read() for m in (email, js.decoder, a, logging, pathlib))
  with open(path, "w") as f:
    f.write(text)
  return path


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(ROOT, "experiments",
                                                                     "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_evaluate(graphdef, valid_vocab, eod_id, head):
  @jax.jit
  def evaluate(state, tokens):
    model = nnx.merge(graphdef, state.params, state.rest, copy=True)
    model.eval()
    out = token_outputs(model, tokens, valid_vocab, True)
    correct = (-out.loss >= out.top1_logprob).astype(jnp.float32)
    stats = {"softmax": calibration.binned_stats(jnp.exp(out.top1_logprob), correct)}
    if head:
      logits, correct, end = meta_outputs(model, out, tokens, eod_id)
      p = jax.nn.sigmoid(logits)
      stats["meta"] = calibration.binned_stats(p[:, 0], correct)
      stats["end"] = calibration.binned_stats(p[:, 1], end)
    return out.loss.sum(), jnp.float32(out.loss.size), stats

  return evaluate


def run_variant(name, args, dataset, workdir):
  from vesperjax.training.trainer import Trainer
  run = tiny_config()
  run.model.update(VARIANTS[name])
  run.data.dataset = dataset
  run.train.update(dict(max_steps=args.steps, eval_every=args.steps,
                        save_every=args.steps, sample_tokens=0,
                        eval_batches=args.eval_batches))
  trainer = Trainer(run, os.path.join(workdir, name))
  trainer.train()
  tok = trainer.built.data.tokenizer
  evaluate = make_evaluate(trainer.built.model.steps.graphdef, tok.vocab_size, tok.eod_id,
                           VARIANTS[name]["meta_head"])
  total = count = 0.0
  stats = {}
  with jax.set_mesh(trainer.built.model.mesh):
    for host in vdata.eval_batches(trainer.built.data.val_cache, run.train.batch_size,
                                   run.data.seq_len, args.eval_batches):
      batch = sharding.global_batch_from_host(host.astype(np.int32), trainer.built.model.mesh,
                                              trainer.built.model.steps.eval_sharding)
      loss_sum, n, batch_stats = evaluate(trainer.state, batch)
      total, count = total + float(loss_sum), count + float(n)
      stats = {k: calibration.add_stats(stats.get(k), v)
               for k, v in jax.device_get(batch_stats).items()}
  trainer.close()
  row = {"variant": name, "steps": args.steps, "eval_tokens": int(count),
         "eval_loss": total / count, **calibration.eval_metrics(stats)}
  print(json.dumps(row), flush=True)
  return row


def table(rows):
  cols = [("variant", "variant", "{}"), ("eval loss", "eval_loss", "{:.3f}"),
          ("top-1 acc", "eval_top1_accuracy", "{:.3f}"),
          ("softmax ECE", "eval_softmax_ece", "{:.4f}"),
          ("softmax AUROC", "eval_softmax_auroc", "{:.4f}"),
          ("head ECE", "eval_meta_ece", "{:.4f}"), ("head AUROC", "eval_meta_auroc", "{:.4f}"),
          ("head P(end) AUROC", "eval_end_auroc", "{:.4f}")]
  lines = ["| " + " | ".join(c[0] for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(fmt.format(r[k]) if k in r else "-"
                                   for _, k, fmt in cols) + " |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--dataset")
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--eval-batches", type=int, default=32)
  p.add_argument("--workdir")
  p.add_argument("--variants", default="none,head,head+trunk")
  args = p.parse_args()
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
  with tempfile.TemporaryDirectory() as tmp:
    workdir = args.workdir or tmp
    os.makedirs(workdir, exist_ok=True)
    dataset = args.dataset or stdlib_corpus(os.path.join(tmp, "corpus.txt"))
    rows = [run_variant(n, args, dataset, workdir) for n in names]
  print(table(rows))


if __name__ == "__main__":
  main()
