"""Weight-only INT8 / INT4 quantization with qwix (vesperjax.inference.quantize): the stored weights
against a numpy per-channel reference, logits through the KV-cache prefill and decode
within a derived error bound (dense, FlyLoRA, MoE), greedy decode and eval perplexity of
a briefly trained run, `generate --quantize`, and the missing-qwix error.

The logits bound. qwix's symmetric absmax quantizer with b bits maps each output channel
to integers in [-2^(b-1), 2^(b-1) - 1] with step s = absmax / (2^(b-1) - 1/2), so each
weight moves by at most s/2; taken as uniform rounding noise, a weight matrix's relative
error is rho = ||W_q - W|| / ||W|| (measured here on the numpy reference: about 0.7%
for int8 and 11% for int4 at Gaussian init, the ratio of the steps being 127.5 / 7.5 = 17).
A matmul's output then has relative error about rho for inputs in general position. The
logits sum the embedding and each layer's branches, whose errors are independent, so
their relative error stays near rho: we require at most 2 rho (headroom for the GLU's
product of two quantized matmuls and for branches partly cancelling), and that the
int4 / int8 error ratio lies within a factor of about 2.5 of the step ratio (so both
modes really quantize at their stated widths).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.inference import quantize as qz
from vesperjax.inference.sampling import generate

KINDS = {"dense": dict(lora_rank=0), "flylora": dict(lora_rank=8, lora_topk=2),
         "moe": dict(lora_rank=4, lora_topk=2, num_experts=4, top_k=2)}
BITS = {"int8": 8, "int4": 4}


def toy(kind: str):
  config = vj.ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2,
                          ffn_size=128, max_seq_len=128, **KINDS[kind])
  model = vj.VesperLM(config, rngs=nnx.Rngs(0))
  model.eval()
  return model


def reference_codes(w: np.ndarray, contracted: set[int], bits: int):
  """Symmetric absmax quantization, one scale per slice over the `contracted` axes:
  (integer codes, scales, ratio w / scale before rounding)."""
  w = np.asarray(w, np.float64)
  absmax = np.abs(w).max(axis=tuple(contracted), keepdims=True)
  scale = absmax / (2 ** (bits - 1) - 0.5)
  ratio = w / scale
  return np.clip(np.rint(ratio), -2 ** (bits - 1), 2 ** (bits - 1) - 1), scale, ratio


def reference_quantized(w: np.ndarray, contracted: set[int], bits: int) -> np.ndarray:
  codes, scale, _ = reference_codes(w, contracted, bits)
  return codes * scale


def weight_at(model, t: qz.QuantizedTensor):
  module = model
  for attr in t.module:
    module = getattr(module, attr)
  return getattr(module, t.name)


def reference_rho(model, bits: int) -> float:
  """Largest relative error ||W_q - W|| / ||W|| over the quantized weights (numpy)."""
  rhos = []
  for t in qz.quantized_tensors(model.config):
    w = np.asarray(weight_at(model, t)[...], np.float64)
    wq = reference_quantized(w, {a + 1 for a in t.contracted}, bits)
    rhos.append(np.linalg.norm(wq - w) / np.linalg.norm(w))
  return max(rhos)


def flat_arrays(model) -> dict:
  """{variable path: its stored value as numpy (a QArray's dequantized value)}."""
  return {tuple(map(str, path)): np.asarray(var[...])
          for path, var in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("kind", ["flylora", "moe"])
def test_weights_match_numpy_per_channel_reference_and_the_rest_is_untouched(kind):
  model = toy(kind)
  before = flat_arrays(model)
  quantized_paths = {(*t.module, t.name) for t in qz.quantized_tensors(model.config)}
  for mode, bits in BITS.items():
    quantized = qz.quantize_for_inference(model, mode)
    for t in qz.quantized_tensors(model.config):
      var = weight_at(quantized, t)
      assert isinstance(var, qz.QuantizedWeight) and not isinstance(var, nnx.Param)
      raw = var.get_raw_value()  # the qwix QArray
      assert raw.qvalue.dtype == {8: jnp.int8, 4: jnp.int4}[bits]
      codes, scale, ratio = reference_codes(weight_at(model, t)[...],
                                            {a + 1 for a in t.contracted}, bits)
      np.testing.assert_allclose(raw.scale, scale, rtol=1e-6)
      # A channel's extreme sits on a rounding tie (+-(2^(b-1) - 1/2)), where float32
      # may land on either side: either neighbour is right there, nowhere else.
      got = np.asarray(raw.qvalue, np.float64)
      tie = np.abs(np.abs(ratio) % 1 - 0.5) < 1e-4
      assert np.all((got == codes) | (tie & (np.abs(got - codes) <= 1)))
      assert (tie & (np.abs(ratio) < 2 ** (bits - 1) - 1)).mean() < 1e-3  # extremes
      np.testing.assert_allclose(var[...], got * raw.scale, rtol=1e-6)  # dequantizes
    # Stored bytes: each quantized weight at b bits plus one fp32 scale per channel.
    saved = 0
    for t in qz.quantized_tensors(model.config):
      w = weight_at(model, t)[...]
      scales = w.size // int(np.prod([w.shape[a + 1] for a in t.contracted]))
      saved += w.size * 4 - (w.size * bits // 8 + scales * 4)
    assert qz.weight_bytes(quantized) == qz.weight_bytes(model) - saved
    # Everything else (embedding / LM head, norms, biases, router, FlyLoRA A and B,
    # routing biases) is bit-identical.
    after = flat_arrays(quantized)
    assert set(after) == set(before)
    for path, value in after.items():
      if path not in quantized_paths:
        np.testing.assert_array_equal(value, before[path], err_msg=str(path))
  # The original model is unchanged.
  for path, value in flat_arrays(model).items():
    np.testing.assert_array_equal(value, before[path], err_msg=str(path))
  assert isinstance(model.blocks.attn.qkv_kernel, nnx.Param)


@nnx.jit
def prefill_then_decode(model, prompt, next_token):
  """Logits of a KV-cache prefill [B, P, V] and of one decode step after it [B, 1, V]
  (the calls `generate` makes)."""
  cache = model.init_cache(prompt.shape[0], 64)
  hidden, _, cache = model.hidden_states(prompt, cache=cache)
  step_hidden, _, _ = model.hidden_states(next_token, cache=cache)
  return model.logits(hidden), model.logits(step_hidden)


def relative_error(got, want) -> float:
  return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefill_and_decode_logits_within_the_derived_bound(kind):
  model = toy(kind)
  rng = np.random.RandomState(1)
  prompt = jnp.asarray(rng.randint(0, 256, (2, 16)), jnp.int32)
  next_token = jnp.asarray(rng.randint(0, 256, (2, 1)), jnp.int32)
  want = prefill_then_decode(model, prompt, next_token)
  errors = {}
  for mode, bits in BITS.items():
    got = prefill_then_decode(qz.quantize_for_inference(model, mode), prompt, next_token)
    rho = reference_rho(model, bits)
    errors[mode] = [relative_error(g, w) for g, w in zip(got, want)]
    for err in errors[mode]:
      assert 0 < err <= 2 * rho, (mode, err, rho)
  for prefill_or_step in range(2):
    ratio = errors["int4"][prefill_or_step] / errors["int8"][prefill_or_step]
    assert 127.5 / 7.5 / 2.5 < ratio < 127.5 / 7.5 * 2.5, errors


def test_unknown_mode_and_none():
  model = toy("dense")
  assert qz.quantize_for_inference(model, None) is model
  with pytest.raises(ValueError, match="int8, int4"):
    qz.quantize_for_inference(model, "int2")


def test_a_quantized_model_is_kept_in_its_mode_and_refused_in_the_other():
  model = toy("dense")
  int8 = qz.quantize_for_inference(model, "int8")
  assert qz.quantization_mode(model) is None and qz.quantization_mode(int8) == "int8"
  assert qz.quantize_for_inference(int8, "int8") is int8
  with pytest.raises(ValueError, match="already quantized to int8"):
    qz.quantize_for_inference(int8, "int4")


def test_missing_qwix_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
  from vesperjax import generate as cli
  monkeypatch.setitem(__import__("sys").modules, "qwix", None)  # import qwix fails
  with pytest.raises(ValueError, match=r"pip install 'vesperjax\[quantize\]'"):
    qz.quantize_for_inference(toy("dense"), "int8")
  code = cli.main(["generate", f"--workdir={tmp_path}", "--prompt=hi", "--quantize=int8"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1, err
  assert err[0] == ("error: quantization needs the qwix package: "
                    "pip install 'vesperjax[quantize]'")


def test_bad_quantize_flag_is_one_line(tmp_path, capsys):
  from vesperjax import generate as cli
  code = cli.main(["generate", f"--workdir={tmp_path}", "--prompt=hi", "--quantize=int3"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: flag --quantize=int3")


# -- a briefly trained run ---------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 2-layer FlyLoRA model trained 40 AdamW steps on ~150 KB of stdlib source (byte
  tokens): its greedy continuations follow the text, unlike a random model's."""
  import argparse
  import email
  import json as js

  from vesperjax.run_config import default_run_config
  from vesperjax.train import train
  root = tmp_path_factory.mktemp("quantize")
  corpus = root / "corpus.txt"
  corpus.write_text("\n\n".join(open(m.__file__).read() for m in (email, js.decoder,
                                                                  argparse)))
  run = default_run_config("tiny")
  run.model.update(dict(hidden_size=64, num_heads=2, num_layers=2, ffn_size=128,
                        lora_rank=4, lora_topk=2, max_seq_len=128))
  run.data.update(dict(dataset=str(corpus), tokenizer="byte", seq_len=64))
  run.optim.update(dict(name="adamw", lr=3e-3, warmup_steps=5))
  run.train.update(dict(batch_size=8, max_steps=40, eval_every=1000, save_every=1000,
                        log_every=10, eval_batches=2, sample_tokens=0))
  workdir = str(root / "run")
  assert train(run, workdir) == 0
  return workdir


def bench_module():
  """benchmarks/quantize_bench.py, imported from its path (benchmarks/ is no package)."""
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location(
      "quantize_bench", os.path.join(root, "benchmarks", "quantize_bench.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_int8_greedy_decode_and_perplexity_stay_with_fp32(trained_run):
  eval_perplexity = bench_module().eval_perplexity
  from vesperjax.inference.loading import load_model
  from vesperjax.training.build import prepare_data
  model, tokenizer, run = load_model(trained_run)
  val = prepare_data(run, trained_run, progress=False).val_cache
  int8 = qz.quantize_for_inference(model, "int8")
  prompts = np.stack([np.asarray(val.tokens[i:i + 16], np.int32) for i in (0, 500, 1000)])
  want = generate(model, prompts, max_new_tokens=48, temperature=0.0)
  got = generate(int8, prompts, max_new_tokens=48, temperature=0.0)
  assert (got == want).mean() >= 0.9, (got != want).sum()

  # Eval perplexity: the fp32 figure is the trainer's own final eval (same 2 batches),
  # int8 stays within 1% of it and int4 within 10%.
  with open(os.path.join(trained_run, "metrics.jsonl")) as f:
    trainer_ppl = [json.loads(ln) for ln in f if "eval_perplexity" in ln][-1]
  ppl = {mode: eval_perplexity(qz.quantize_for_inference(model, mode), val, 8, 64, 2,
                               tokenizer.vocab_size) for mode in (None, "int8", "int4")}
  assert ppl[None] == pytest.approx(trainer_ppl["eval_perplexity"], rel=1e-4)
  assert ppl["int8"] == pytest.approx(ppl[None], rel=0.01)
  assert ppl["int4"] == pytest.approx(ppl[None], rel=0.10)


def test_generate_cli_quantize_equals_the_library(trained_run, capsys):
  from vesperjax import generate as cli
  from vesperjax.inference.loading import load_model
  args = ["generate", f"--workdir={trained_run}", "--prompt=def main(", "--max-tokens=24",
          "--temperature=0", "--quantize=int4"]
  assert cli.main(args) == 0
  printed = capsys.readouterr().out.strip("\n")
  model, tokenizer, _ = load_model(trained_run)
  ids = generate(qz.quantize_for_inference(model, "int4"), [tokenizer.encode("def main(")],
                 max_new_tokens=24, temperature=0.0, eos_id=tokenizer.eod_id)
  assert printed == "def main(" + tokenizer.decode(list(ids[0]), skip_special_tokens=True)
  assert len(printed) > len("def main(")
