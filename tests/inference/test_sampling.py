"""Sampling: KV-cache decoding equals full recomputation, top-k/top-p/temperature
semantics checked against numpy, eos handling, no per-token recompilation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.inference import sampling
from vesperjax.inference.sampling import generate, sample_logits


def toy(**kw):
  cfg = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
             max_seq_len=96, lora_rank=4, lora_topk=2)
  cfg.update(kw)
  return vj.VesperLM(vj.ModelConfig(**cfg), rngs=nnx.Rngs(3))


def greedy_by_recompute(model, prompt, n, adjust=None):
  """The slow reference: the whole sequence through the model for every new token.

  The sequence lives in a fixed [B, P + n] buffer (one compile): causal attention
  keeps the not-yet-written zeros from affecting the logits read at position t.
  `adjust(logits [V], seq [P + n], t)`, if given, changes each row's last logits (in
  numpy) before the argmax.
  """
  model.eval()
  fwd = nnx.jit(lambda m, x: m(x)[0])
  b, p = prompt.shape
  seq = np.zeros((b, p + n), np.int32)
  seq[:, :p] = prompt
  for t in range(p, p + n):
    logits = np.asarray(fwd(model, jnp.asarray(seq)))[:, t - 1]
    if adjust is not None:
      logits = np.stack([adjust(logits[row], seq[row], t) for row in range(b)])
    seq[:, t] = np.argmax(logits, -1)
  return seq[:, p:]


@pytest.mark.parametrize("experts", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_kv_cache_greedy_equals_full_recompute(experts):
  model = toy(num_experts=experts)
  prompt = np.random.RandomState(0).randint(0, 97, (2, 7))
  got = generate(model, prompt, max_new_tokens=12, temperature=0.0)
  assert got.shape == (2, 12)
  np.testing.assert_array_equal(got, greedy_by_recompute(model, prompt, 12))


def test_streaming_equals_loop_and_does_not_recompile_per_token():
  model = toy()
  prompt = [5, 6, 7, 8]
  seen = []
  a = generate(model, prompt, max_new_tokens=9, temperature=0.9, top_k=20, top_p=0.9,
               seed=4, on_token=seen.append)
  b = generate(model, prompt, max_new_tokens=9, temperature=0.9, top_k=20, top_p=0.9,
               seed=4)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.stack(seen, 1), a)
  compiled = sampling._decode_loop._cache_size()
  # New prompt length (same bucket), new sampling settings, more tokens: no new compile.
  generate(model, [1, 2, 3, 4, 5, 6], max_new_tokens=20, temperature=0.5, top_k=3,
           seed=1, on_token=lambda t: None)
  assert sampling._decode_loop._cache_size() == compiled
  # The model itself is untouched (generation runs a copy in eval mode).
  assert model.blocks.ffn.gate.deterministic is False


def test_seed_changes_samples_and_prompt_list_equals_array():
  model = toy()
  a = generate(model, [1, 2, 3], max_new_tokens=16, seed=0)
  b = generate(model, np.array([[1, 2, 3]]), max_new_tokens=16, seed=0)
  c = generate(model, [1, 2, 3], max_new_tokens=16, seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_eos_stops_rows_and_pads_with_eos():
  model = toy()
  prompt = np.array([[1, 2, 3], [4, 5, 6]])
  free = generate(model, prompt, max_new_tokens=10, temperature=0.0)
  eos = int(free[0, 2])  # row 0 will emit it at step 2
  got = generate(model, prompt, max_new_tokens=10, temperature=0.0, eos_id=eos)
  row0 = list(free[0]).index(eos)
  assert (got[0, row0:] == eos).all()
  np.testing.assert_array_equal(got[0, :row0], free[0, :row0])
  # Streaming stops early too once every row is done.
  single = generate(model, prompt[:1], max_new_tokens=10, temperature=0.0, eos_id=eos,
                    on_token=lambda t: None)
  assert single.shape == (1, row0 + 1) and single[0, -1] == eos


def test_length_and_argument_errors():
  model = toy()
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(model, list(range(90)), max_new_tokens=10)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(model, [1], max_new_tokens=0)
  with pytest.raises(ValueError, match="token ids"):
    generate(model, [1, 200], max_new_tokens=2)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, [1], max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="non-empty"):
    generate(model, [], max_new_tokens=2)


# --- sample_logits against numpy ---------------------------------------------------------

def allowed_set(logits, temperature, top_k, top_p):
  """numpy: the tokens top-k then top-p may return (sorted cumulative mass < top_p)."""
  scaled = logits.astype(np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  k = top_k or len(scaled)
  kept = order[:k]
  p = np.exp(scaled[kept] - scaled[kept].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  return set(kept[(before < top_p) | (np.arange(k) == 0)].tolist()), kept, before


DRAWS = 3000
draw = jax.jit(jax.vmap(sample_logits, in_axes=(None, 0, None, None, None)))


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 5, 1.0), (1.0, 0, 0.6), (0.7, 12, 0.8), (2.0, 1, 1.0), (1.0, 40, 0.3)])
def test_samples_stay_inside_top_k_top_p(temperature, top_k, top_p):
  rng = np.random.RandomState(top_k)
  logits = (rng.randn(64) * 2.0).astype(np.float32)
  allowed, kept, before = allowed_set(logits, temperature, top_k, top_p)
  # keep away from the boundary, where float32 vs float64 sums could disagree
  assert np.min(np.abs(before - top_p)) > 1e-4
  keys = jax.random.split(jax.random.key(7), DRAWS)
  got = np.asarray(draw(jnp.asarray(logits), keys, temperature, top_k, top_p))
  assert set(got.tolist()) <= allowed
  # and it samples from them in proportion: every token with >= 3% mass shows up
  scaled = logits[sorted(allowed)] / temperature
  p = np.exp(scaled - scaled.max())
  p /= p.sum()
  common = {t for t, q in zip(sorted(allowed), p) if q >= 0.03}
  assert common <= set(got.tolist())
  for t, q in zip(sorted(allowed), p):
    assert abs(np.mean(got == t) - q) < 0.04


def test_temperature_zero_is_argmax_and_top_k_one_too():
  logits = jax.random.normal(jax.random.key(0), (8, 1000)) * 3
  want = np.argmax(np.asarray(logits), -1)
  for key in range(3):
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(key), 0.0), want)
    np.testing.assert_array_equal(
        sample_logits(logits, jax.random.key(key), 1.0, top_k=1), want)


def test_filter_handles_batch_rows_independently_and_negative_logits():
  logits = jnp.array([[-5.0, -1.0, -3.0, -2.0], [0.5, 0.1, 0.4, -jnp.inf]])
  filt = jax.jit(sampling._filter_top_k_top_p)
  out = np.asarray(filt(logits, jnp.int32(2), jnp.float32(1.0)))
  np.testing.assert_array_equal(np.isfinite(out), [[0, 1, 0, 1], [1, 0, 1, 0]])


def test_streaming_callback_error_propagates_and_stops():
  model = toy()
  calls = []

  def on_token(t):
    calls.append(t)
    if len(calls) == 3:
      raise BrokenPipeError("reader went away")

  with pytest.raises(BrokenPipeError, match="reader went away"):
    generate(model, [1, 2, 3], max_new_tokens=12, seed=0, on_token=on_token)
  assert len(calls) == 3  # no call after the one that failed
  # the next streaming call works (the failed call's sink is gone)
  seen = []
  generate(model, [1, 2, 3], max_new_tokens=5, seed=0, on_token=seen.append)
  assert len(seen) == 5
