"""`train.init_from=DIR`: a new run starts from an export's weights (fp32 or bf16) with a
fresh optimizer state; its first evaluation is the export's loss on the same batches;
a quantized export, another model or another tokenizer is one error line."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from tests.test_export_hf import save_run
from vesperjax import data as vdata
from vesperjax import export as ex
from vesperjax.run_config import default_run_config
from vesperjax.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = dict(hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, lora_rank=4,
             lora_topk=2)  # the exported model's shape (save_run adds init_std, seq len)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """~100 KB of real text: two stdlib modules."""
  import argparse, json  # noqa: E401
  text = "\n\n".join(open(m.__file__).read() for m in (json.decoder, argparse))
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(text)
  return str(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """exported(options) -> an export of one saved FlyLoRA run (fp32, bf16, int8 ...)."""
  workdir = save_run(tmp_path_factory.mktemp("source"), **MODEL)
  done = {}

  def get(**options):
    key = tuple(sorted(options.items()))
    if key not in done:
      done[key] = str(tmp_path_factory.mktemp("export") / "out")
      ex.export(workdir, done[key], **options)
    return done[key]
  return get


def fine_tune(corpus, export, **model):
  """A run starting from `export`: the same model keys (init_std and max_seq_len left at
  the preset's: they need not match), its tokenizer, adapter-only training."""
  run = default_run_config("tiny")
  run.model.update(dict(MODEL, freeze_base=True, **model))
  run.data.update(dict(dataset=corpus, tokenizer=os.path.join(export, "tokenizer.json"),
                       seq_len=32))
  run.optim.update(dict(lr=3e-3, warmup_steps=1))
  run.train.update(dict(batch_size=8, max_steps=3, eval_every=3, save_every=3, log_every=1,
                        eval_batches=2, sample_tokens=0, init_from=export))
  return run


def export_loss(export, trainer) -> float:
  """Mean next-token loss of the export's own model (`load_pretrained`, fp32) on the
  run's evaluation batches, in numpy: logits past the tokenizer's ids masked out."""
  model, tok = vj.load_pretrained(export, dtype="float32")
  t = trainer.run.train
  forward = nnx.jit(lambda m, x: m(x)[0])
  losses = []
  for batch in vdata.eval_batches(trainer.built.data.val_cache, t.batch_size,
                                  trainer.run.data.seq_len, t.eval_batches):
    logits = np.asarray(forward(model, jnp.asarray(batch[:, :-1], jnp.int32)), np.float64)
    logits[..., tok.vocab_size:] = -np.inf
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    losses.append(-np.take_along_axis(logp, batch[:, 1:, None].astype(np.int64), -1))
  return float(np.concatenate(losses).mean())


def variable(state_part, *path):
  return np.asarray(dict(nnx.to_flat_state(state_part))[path][...])


def test_a_run_starts_at_the_exports_loss_and_trains_its_adapters(corpus, exported,
                                                                  tmp_path):
  export = exported()
  trainer = Trainer(fine_tune(corpus, export), str(tmp_path / "run"))
  try:
    first = trainer.evaluate()
    assert first == pytest.approx(export_loss(export, trainer), rel=1e-5)
    state = trainer.state
    assert int(state.step) == 0
    counts = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.int32]
    assert all(int(c) == 0 for c in counts)  # a fresh optimizer state
    reference, _ = vj.load_pretrained(export)
    ref = nnx.state(reference)
    kernel = ("blocks", "ffn", "up", "kernel")
    b = ("blocks", "ffn", "up", "lora_b")
    np.testing.assert_array_equal(variable(state.rest, *kernel), variable(ref, *kernel))
    np.testing.assert_array_equal(variable(state.params, *b), variable(ref, *b))
    outcome = trainer.train()
    assert outcome.step == 3 and np.isfinite(outcome.eval_loss)
    # adapter-only: the base stays the export's, B moves
    np.testing.assert_array_equal(variable(trainer.state.rest, *kernel),
                                  variable(ref, *kernel))
    assert np.abs(variable(trainer.state.params, *b) - variable(ref, *b)).max() > 0
  finally:
    trainer.close()


def test_a_bf16_export_starts_at_its_loss(corpus, exported, tmp_path):
  export = exported(dtype="bf16")
  trainer = Trainer(fine_tune(corpus, export), str(tmp_path / "run"))
  try:
    assert trainer.evaluate() == pytest.approx(export_loss(export, trainer), rel=1e-5)
  finally:
    trainer.close()


@pytest.mark.parametrize("change,message", [
    (dict(model=dict(lora_rank=8)), "this run's model.lora_rank is 8, the export's 4; "
                                    "set model.lora_rank=4"),
    (dict(data=dict(tokenizer="bpe:300")), "this run's tokenizer differs from the export's"),
])
def test_another_model_or_tokenizer_is_refused(corpus, exported, tmp_path, change, message):
  export = exported()
  run = fine_tune(corpus, export)
  for section, values in change.items():
    run[section].update(values)
  with pytest.raises(ValueError) as e:
    Trainer(run, str(tmp_path / "run"))
  assert str(e.value).startswith(f"train.init_from={export}: ")
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_quantized_export_is_one_error_line(corpus, exported, tmp_path):
  export = exported(quantize="int8")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  args = [f"--config.model.{k}={v}" for k, v in MODEL.items()]
  proc = subprocess.run(
      [sys.executable, "-m", "vesperjax.train", "--config", "experiments/tiny.py",
       f"--workdir={tmp_path / 'run'}", *args, f"--config.data.dataset={corpus}",
       f"--config.data.tokenizer={export}/tokenizer.json", "--config.data.seq_len=32",
       "--config.train.batch_size=8", f"--config.train.init_from={export}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  err = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and err[-1].startswith("error: "), proc.stderr
  assert err[-1] == (f"error: train.init_from={export}: the export is quantized (int8), "
                     "rounded weights that cannot train; export without --quantize")
