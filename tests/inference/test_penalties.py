"""Repetition, frequency and presence penalties: each rule against numpy, greedy decoding
with penalties against a step-by-step full-forward reference, traced settings (no
recompile), and the one-line errors of generate() and the CLI."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.inference import sampling
from vesperjax.inference.penalties import Penalties, TokenHistory, apply_penalties
from vesperjax.inference.sampling import generate

from tests.inference.test_sampling import greedy_by_recompute

VOCAB = 97


def toy():
  cfg = vj.ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                       ffn_size=64, max_seq_len=96, lora_rank=4, lora_topk=2)
  return vj.VesperLM(cfg, rngs=nnx.Rngs(3))


def penalised_np(logits, prompt, generated, repetition=1.0, frequency=0.0, presence=0.0):
  """numpy, one row: the original's loop over set(prompt + generated), then OpenAI's
  `- count * frequency - (count > 0) * presence` over the generated tokens."""
  out = np.array(logits, np.float32)
  for t in set(list(prompt) + list(generated)):
    out[t] = out[t] / np.float32(repetition) if out[t] > 0 else out[t] * np.float32(
        repetition)
  counts = np.bincount(np.asarray(generated, np.int64), minlength=len(out))
  return (out - counts.astype(np.float32) * np.float32(frequency)
          - (counts > 0).astype(np.float32) * np.float32(presence))


def history_of(prompts, generated):
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = [len(p) for p in prompts]
  assert len(set(lengths)) == 1, "one length per call, as generate() has"
  history = TokenHistory.of_prompt(jnp.asarray(tokens), lengths[0], VOCAB)
  for step in np.asarray(generated, np.int32).T:
    history = history.add(jnp.asarray(step))
  return history


@pytest.mark.parametrize("repetition,frequency,presence", [
    (1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.4, 0.0), (1.0, 0.0, 0.9),
    (1.1, 0.25, -0.5), (1.0, 0.0, 0.0)])
def test_penalties_equal_numpy_reference(repetition, frequency, presence):
  rng = np.random.RandomState(0)
  logits = rng.randn(2, VOCAB).astype(np.float32) * 3
  logits[:, :5] = [0.0, -2.0, 2.0, 1e-3, -1e-3]  # both signs and zero are in the history
  prompts = [[0, 1, 2, 7, 7, 40], [3, 4, 50, 51, 52, 53]]
  generated = [[2, 9, 9, 9, 60, 3], [4, 4, 11, 96, 0, 1]]
  history = history_of(prompts, generated)
  got = jax.jit(apply_penalties)(jnp.asarray(logits), history,
                                 Penalties.of(repetition, frequency, presence))
  want = np.stack([penalised_np(logits[i], prompts[i], generated[i], repetition,
                                frequency, presence) for i in range(2)])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  if (repetition, frequency, presence) == (1.0, 0.0, 0.0):
    np.testing.assert_array_equal(np.asarray(got), logits)
  else:
    assert not np.allclose(want, logits)  # the case really penalises something


def test_prompt_padding_is_not_history():
  tokens = jnp.array([[5, 6, 0, 0]], jnp.int32)  # length 2: the zeros are padding
  history = TokenHistory.of_prompt(tokens, 2, VOCAB)
  assert np.flatnonzero(np.asarray(history.in_prompt[0])).tolist() == [5, 6]
  assert int(history.generated.sum()) == 0


def greedy_penalised_by_recompute(model, prompt, n, **penalties):
  """The slow reference: test_sampling.py's full recompute per token, the penalties applied
  in numpy to the last position's logits before the argmax."""
  p = prompt.shape[1]
  return greedy_by_recompute(
      model, prompt, n,
      adjust=lambda logits, seq, t: penalised_np(logits, seq[:p], seq[p:t], **penalties))


@pytest.mark.parametrize("penalties", [
    dict(repetition=2.0), dict(frequency=0.5, presence=0.3)])
def test_greedy_with_penalties_equals_full_recompute(penalties):
  model = toy()
  prompt = np.random.RandomState(1).randint(0, VOCAB, (2, 6))
  kw = {f"{k}_penalty": v for k, v in penalties.items()}
  got = generate(model, prompt, max_new_tokens=14, temperature=0.0, **kw)
  want = greedy_penalised_by_recompute(model, prompt, 14, **penalties)
  np.testing.assert_array_equal(got, want)
  plain = generate(model, prompt, max_new_tokens=14, temperature=0.0)
  assert not np.array_equal(got, plain)  # the penalties changed the path
  streamed = []
  again = generate(model, prompt, max_new_tokens=14, temperature=0.0,
                   on_token=streamed.append, **kw)
  np.testing.assert_array_equal(again, got)
  np.testing.assert_array_equal(np.stack(streamed, 1), got)


def test_penalty_values_do_not_recompile():
  model = toy()
  generate(model, [1, 2, 3], max_new_tokens=5, seed=0, repetition_penalty=1.2)
  compiled = (sampling._prefill._cache_size(), sampling._decode_loop._cache_size())
  a = generate(model, [1, 2, 3], max_new_tokens=5, seed=0, repetition_penalty=3.0,
               frequency_penalty=1.0, presence_penalty=-0.5)
  b = generate(model, [1, 2, 3], max_new_tokens=5, seed=0)
  assert (sampling._prefill._cache_size(), sampling._decode_loop._cache_size()) == compiled
  assert a.shape == b.shape == (1, 5)


@pytest.mark.parametrize("kw,needle", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=-1.1), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty must be a finite number"),
    (dict(presence_penalty=float("nan")), "presence_penalty must be a finite number")])
def test_bad_penalties_raise(kw, needle):
  with pytest.raises(ValueError, match=needle):
    generate(toy(), [1, 2], max_new_tokens=2, **kw)


@pytest.mark.parametrize("flag,needle", [
    ("--repetition-penalty=0", "error: --repetition-penalty 0.0: must be a finite number "
     "> 0 (1: off)"),
    ("--frequency-penalty=nan", "error: --frequency-penalty nan: must be a finite number"),
    ("--presence-penalty=inf", "error: --presence-penalty inf: must be a finite number"),
    ("--repetition-penalty=x", "error: flag --repetition-penalty=x: could not convert")])
def test_cli_penalty_flags_are_one_error_line(flag, needle, tmp_path, capsys):
  from vesperjax import generate as cli
  code = cli.main(["generate", "--workdir", str(tmp_path), "--prompt", "hi", flag])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith(needle), err
