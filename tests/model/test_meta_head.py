"""The metacognition head: targets against numpy, gradients, training and eval metrics,
checkpoints with and without it, calibration numbers by hand, generation's stop rule."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.training import calibration
from vesperjax.kernels import linear_cross_entropy
from vesperjax.model.meta_head import meta_head_params, meta_loss, meta_probs
from vesperjax.training.train_step import meta_outputs, token_outputs

CFG = dict(vocab_size=67, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
           max_seq_len=64, lora_rank=4, lora_topk=2, meta_head=True)


def toy(seed=3, **kw):
  return vj.VesperLM(vj.ModelConfig(**{**CFG, **kw}), rngs=nnx.Rngs(seed))


def numpy_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ targets


@pytest.mark.parametrize("impl,interpret", [("chunked", False), ("pallas", True)])
def test_kernel_top1_logprob_matches_numpy(impl, interpret):
  """The chunked loss's running max gives max log softmax; padding ids never win."""
  rng = np.random.RandomState(0)
  n, v, d, valid = 40, 70, 16, 61
  h = rng.randn(n, d).astype(np.float32)
  w = rng.randn(v, d).astype(np.float32)
  w[valid:] *= 50  # padded ids with huge logits: masked, so never the top-1
  labels = rng.randint(0, valid, n)
  loss, _, top1 = linear_cross_entropy(jnp.asarray(h), jnp.asarray(w), jnp.asarray(labels),
                                       valid_vocab=valid, block_tokens=16, block_vocab=16,
                                       impl=impl, interpret=interpret, return_top1=True)
  logp = numpy_log_softmax((h.astype(np.float64) @ w.T)[:, :valid])
  np.testing.assert_allclose(top1, logp.max(-1), rtol=1e-5, atol=1e-5)
  correct = np.asarray(-loss >= top1)
  np.testing.assert_array_equal(correct, logp.argmax(-1) == labels)


@pytest.mark.parametrize("fused", [True, False])
def test_targets_match_numpy_reference(fused):
  model = toy()
  eod = 5
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, 67, (3, 17))
  tokens[:, 1::2] = tokens[:, 0:-1:2]  # repeats: some top-1 guesses come out right
  tokens[:, 9] = eod
  out = token_outputs(model, jnp.asarray(tokens), 67, fused)
  _, correct, end = meta_outputs(model, out, jnp.asarray(tokens), eod)
  logits = np.asarray(model(jnp.asarray(tokens[:, :-1]))[0], np.float64).reshape(-1, 67)
  targets = tokens[:, 1:].reshape(-1)
  np.testing.assert_array_equal(np.asarray(correct), logits.argmax(-1) == targets)
  np.testing.assert_array_equal(np.asarray(end), targets == eod)
  assert np.asarray(end).sum() == 3
  np.testing.assert_allclose(out.top1_logprob, numpy_log_softmax(logits).max(-1),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- gradients


def _meta_grads(trunk_grad):
  model = toy(meta_trunk_grad=trunk_grad)
  # the output layer starts at zero, which would hide every gradient behind it
  model.meta_head.w_out[...] = 0.5 * jax.random.normal(jax.random.key(0),
                                                        model.meta_head.w_out.shape)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 67, (2, 13)))

  def loss(params):
    m = nnx.merge(graphdef, params, rest, copy=True)
    out = token_outputs(m, tokens, 67, True)
    return meta_loss(*meta_outputs(m, out, tokens, 5))["meta_loss"]

  return jax.grad(loss)(params)


@pytest.mark.parametrize("trunk_grad", [False, True])
def test_gradients_reach_the_trunk_only_when_asked(trunk_grad):
  grads = nnx.to_flat_state(_meta_grads(trunk_grad))
  head = {p: g[...] for p, g in grads if p[0] == "meta_head"}
  trunk = {p: g[...] for p, g in grads if p[0] != "meta_head"}
  assert set(head) == {("meta_head", n) for n in ("w_in", "b_in", "w_out", "b_out")}
  for g in [*head.values(), *trunk.values()]:
    assert np.isfinite(np.asarray(g)).all()
  assert all(np.abs(np.asarray(g)).max() > 0 for g in head.values())
  trunk_norm = sum(float(np.abs(np.asarray(g)).sum()) for g in trunk.values())
  if trunk_grad:
    assert trunk_norm > 0
    assert np.abs(np.asarray(trunk[("final_norm", "scale")])).max() > 0
  else:
    assert trunk_norm == 0.0


def test_head_param_count_and_config_errors():
  model = toy()
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model.meta_head, nnx.Param)))
  assert n == meta_head_params(32)
  assert vj.num_params(vj.ModelConfig(**CFG)) - vj.num_params(
      vj.ModelConfig(**{**CFG, "meta_head": False})) == n
  base = {k: v for k, v in CFG.items() if k != "meta_head"}
  for bad, field in [(dict(meta_head=True, meta_weight=-1.0), "meta_weight"),
                     (dict(meta_head=True, meta_weight=float("nan")), "meta_weight"),
                     (dict(meta_head=True, meta_weight=True), "meta_weight"),
                     (dict(meta_head="yes"), "meta_head"),
                     (dict(meta_trunk_grad=True), "meta_trunk_grad")]:
    with pytest.raises(ValueError, match=f"ModelConfig.{field}="):
      vj.ModelConfig(**base, **bad)
  # a config saved before the head existed still reads back, without it
  saved = vj.ModelConfig(**base).to_dict()
  for key in ("meta_head", "meta_weight", "meta_trunk_grad"):
    saved.pop(key)
  assert not vj.ModelConfig.from_dict(saved).meta_head
  assert not hasattr(vj.VesperLM(vj.ModelConfig.from_dict(saved), rngs=nnx.Rngs(0)),
                     "meta_head")


# -------------------------------------------------------------------------- calibration


def test_ece_and_auroc_by_hand():
  conf = np.array([0.1, 0.4, 0.35, 0.8, 0.95])
  correct = np.array([0, 0, 1, 1, 1])
  # every confidence in its own bin: ECE = mean |outcome - confidence|
  assert calibration.expected_calibration_error(conf, correct) == pytest.approx(1.4 / 5)
  # 0.50 and 0.52 share bin 7 of 15: |accuracy 0.5 - confidence 0.51|
  assert calibration.expected_calibration_error([0.5, 0.52], [1, 0]) == pytest.approx(0.01)
  # positives 0.35, 0.8, 0.95 against negatives 0.1, 0.4: 5 of 6 pairs ordered
  assert calibration.auroc(conf, correct) == pytest.approx(5 / 6)
  assert calibration.auroc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)  # tie: half
  assert np.isnan(calibration.auroc([0.3, 0.4], [1, 1]))
  summary = calibration.summarize(calibration.binned_stats(conf, correct))
  assert summary["ece"] == pytest.approx(1.4 / 5, abs=1e-6)
  assert summary["auroc"] == pytest.approx(5 / 6)
  assert summary["accuracy"] == pytest.approx(0.6)


def test_binned_sums_over_batches_equal_the_exact_numbers():
  rng = np.random.RandomState(0)
  conf = rng.beta(2, 2, 3000)
  correct = (rng.rand(3000) < conf).astype(np.float32)
  total = None
  for part in np.array_split(np.arange(3000), 3):
    total = calibration.add_stats(total, calibration.binned_stats(conf[part], correct[part]))
  summary = calibration.summarize(total)
  assert summary["ece"] == pytest.approx(
      calibration.expected_calibration_error(conf, correct), abs=1e-5)
  # binning to 1/4096 moves AUROC by at most the pairs sharing a bin
  assert summary["auroc"] == pytest.approx(calibration.auroc(conf, correct), abs=2e-3)


# ------------------------------------------------------------ training, eval, checkpoints


def test_training_logs_head_metrics_and_checkpoints_keep_it(tmp_path, capsys):
  from tests.test_train import tiny_run
  from vesperjax.training.build import RunError
  from vesperjax.inference.loading import load_model
  from vesperjax.training.trainer import Trainer

  text = "\n\n".join(open(m.__file__).read() for m in (json.decoder, os))
  path = tmp_path / "corpus.txt"
  path.write_text(text)
  run = tiny_run(str(path), max_steps=4, eval_every=4, save_every=4)
  run.model.update(dict(meta_head=True, meta_weight=0.5))
  workdir = str(tmp_path / "run")
  trainer = Trainer(run, workdir)
  trainer.train()
  trainer.close()
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r for r in recs if "loss" in r]
  for key in ("meta_loss", "meta_correct_acc", "meta_end_acc"):
    assert all(np.isfinite(r[key]) for r in steps), key
  assert all(0 <= r["meta_correct_acc"] <= 1 for r in steps)
  evals = [r for r in recs if "eval_loss" in r]
  for key in ("eval_meta_ece", "eval_meta_auroc", "eval_softmax_ece",
              "eval_softmax_auroc", "eval_top1_accuracy"):
    assert 0 <= evals[-1][key] <= 1, key
  model, _, _ = load_model(workdir)
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, nnx.state(model.meta_head, nnx.Param)),
               jax.tree.map(np.asarray, dict(trainer.state.params)["meta_head"]))
  from vesperjax import generate as gen
  args = ["generate", f"--workdir={workdir}", "--prompt=def ", "--max-tokens=6",
          "--temperature=0"]
  capsys.readouterr()
  assert gen.main(args + ["--show-confidence", "--stop-when-confident=0.99"]) == 0
  err = capsys.readouterr().err
  assert "P(correct)" in err and "P(end)" in err
  table = err[err.index("P(correct)"):].splitlines()[1:]
  rows = [line.split() for line in table if line.split() and line.split()[0].isdigit()]
  assert 1 <= len(rows) <= 6 and all(0 <= float(r[-3]) <= 1 for r in rows)
  assert gen.main(args + ["--stop-when-confident=1.5"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --stop-when-confident 1.5"), err
  # the workdir holds a model with the head: resuming without it is refused
  run.model.meta_head = False
  run.model.meta_weight = None
  with pytest.raises(RunError, match="meta_head"):
    Trainer(run, workdir)


# --------------------------------------------------------------------------- generation


def _generating_model(end_bias=0.0):
  model = toy(seed=4)
  head = model.meta_head
  head.w_out[...] = jax.random.normal(jax.random.key(1), head.w_out.shape)
  head.b_out[...] = jnp.array([0.0, end_bias])
  model.eval()
  return model


def test_generate_confidence_matches_a_full_forward():
  from vesperjax.model.meta_head import logit_stats
  from vesperjax.inference.sampling import generate
  model = _generating_model()
  prompt = np.random.RandomState(0).randint(0, 67, (2, 5))
  seen = []
  ids, conf = generate(model, prompt, max_new_tokens=7, temperature=0.0,
                       with_confidence=True,
                       on_token=lambda t, c: seen.append((t, c)))
  assert ids.shape == conf.correct.shape == conf.end.shape == (2, 7)
  seq = jnp.asarray(np.concatenate([prompt, ids], 1))
  hidden, _, _ = model.hidden_states(seq)
  logits = model.logits(hidden)
  top1, entropy = logit_stats(logits)
  p_correct, p_end = meta_probs(model.meta_logits(hidden, top1, entropy))
  at = slice(4, 11)  # token t + 1 comes from position t
  np.testing.assert_allclose(conf.correct, p_correct[:, at], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(conf.end, p_end[:, at], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(conf.top1_prob, np.exp(top1[:, at]), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.stack([t for t, _ in seen], 1), ids)
  np.testing.assert_allclose(np.stack([c.end for _, c in seen], 1), conf.end, rtol=1e-6)


def test_stop_when_confident_ends_rows_where_the_head_says_so():
  from vesperjax.inference.sampling import generate
  eos = 3
  model = _generating_model()
  prompt = np.random.RandomState(1).randint(4, 67, (2, 4))
  kw = dict(max_new_tokens=10, temperature=1.0, seed=2, eos_id=eos)  # same draws each run
  free, conf = generate(model, prompt, with_confidence=True, **kw)
  assert free.shape == (2, 10) and not (free == eos).any()
  # the last step whose P(end) beats every earlier one in row 0: the rule fires there
  end = conf.end[0]
  k = [t for t in range(1, 10) if end[t] > end[:t].max()][-1]
  threshold = float((end[:k].max() + end[k]) / 2)
  stopped = generate(model, prompt, stop_when_confident=threshold, **kw)
  np.testing.assert_array_equal(stopped[0, :k], free[0, :k])
  assert (stopped[0, k:] == eos).all()
  row1 = np.flatnonzero(conf.end[1] > threshold)
  first = row1[0] if row1.size else 10
  np.testing.assert_array_equal(stopped[1, :first], free[1, :first])
  assert (stopped[1, first:] == eos).all()
  # a head that always says "end" stops every row at once; one that never does, none
  sure = _generating_model(end_bias=30.0)
  assert generate(sure, prompt, stop_when_confident=0.9, **kw).tolist() == [[eos]] * 2
  never = _generating_model(end_bias=-30.0)
  np.testing.assert_array_equal(
      generate(never, prompt, stop_when_confident=0.001, **kw), free)


def test_generate_confidence_errors():
  from vesperjax.inference.sampling import generate
  plain = toy(meta_head=False)
  with pytest.raises(ValueError, match="metacognition head"):
    generate(plain, [1, 2], max_new_tokens=2, with_confidence=True)
  with pytest.raises(ValueError, match="metacognition head"):
    generate(plain, [1, 2], max_new_tokens=2, stop_when_confident=0.5, eos_id=0)
  model = toy()
  for bad in (0.0, 1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="stop_when_confident"):
      generate(model, [1, 2], max_new_tokens=2, stop_when_confident=bad, eos_id=0)
  with pytest.raises(ValueError, match="eos_id"):
    generate(model, [1, 2], max_new_tokens=2, stop_when_confident=0.5)


def test_train_cli_rejects_a_bad_meta_key(tmp_path):
  from tests.test_train import cli, overrides
  corpus = tmp_path / "c.txt"
  corpus.write_text("some text\n\nmore text\n")
  r = cli(*overrides(str(corpus), tmp_path / "run"), "--config.model.meta_head=True",
          "--config.model.meta_weight=-1")
  assert r.returncode == 2, r.stderr
  errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "meta_weight" in errors[0], r.stderr
  assert "Traceback" not in r.stderr
