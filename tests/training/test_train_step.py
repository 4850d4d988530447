"""The train step against an independent computation.

For dense, FlyLoRA and MoE models, one step of the trainer's jitted step
(`train_step.sharded_steps`, as `Trainer` builds it) is compared with a plain one: the
model's logits -> optax's cross-entropy (+ the MoE aux loss) -> `jax.grad`, averaged over
the micro-batches, -> the float64 numpy Velvet of tests/optim/test_velvet.py fed the loss
and entropy computed here. The loss, the entropy, the gradient norm, Velvet's scales, the
new parameters, the moments and the gradient-free state must all agree. The data and the
embedding's scale are chosen so that both of Velvet's scales sit inside their band (not
1.0 and not clamped), so a step that stopped handing Velvet its signals, or handed it
the wrong one, fails here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import vesperjax as vj
from tests.optim.test_velvet import NpVelvet, np_scales
from vesperjax import sharding
from vesperjax.model import trainable_filter
from vesperjax.optim.velvet import VelvetState
from vesperjax.run_config import OptimConfig
from vesperjax.training.train_step import sharded_steps

VOCAB, VALID = 64, 60  # ids 60..63 are vocab padding: masked out of the softmax
KINDS = {
    "dense": dict(lora_rank=0),
    "flylora": dict(lora_rank=8, lora_topk=2),
    "moe": dict(num_experts=4, top_k=2, lora_rank=4, lora_topk=2, moe_aux_weight=0.1),
}
# no warmup (step 1 runs at the peak lr), no clipping: the moments keep the gradient's
# scale, so a gradient summed instead of averaged shows in them
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1, max_grad_norm=1e6, eps=1e-6)
EMBED_SCALE = 7.5  # peaked predictions: entropy ~0.6 ln V (es ~1.2)
REPEAT = 0.35  # share of tokens equal to the one before: loss ~3.8 (ps ~0.9)


def model_config(kind):
  return vj.ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2,
                        ffn_size=64, max_seq_len=64, **KINDS[kind])


@functools.lru_cache(maxsize=None)
def built(kind):
  """(config, mesh, ShardedSteps, initial state with the embedding scaled)."""
  config = model_config(kind)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  steps = sharded_steps(config, mesh, optim=OPTIM, max_steps=10, valid_vocab=VALID)
  with jax.set_mesh(mesh):
    state = steps.init(jax.random.key(0))
  embed = state.params["embed"]
  embed[...] = embed[...] * EMBED_SCALE
  return config, mesh, steps, state


def batch(seed, accum, rows, seq):
  """int32 [accum, rows, seq + 1] of valid ids, a REPEAT share copying the one before."""
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, VALID, (accum, rows, seq + 1))
  same = rng.random(toks.shape) < REPEAT
  for s in range(1, seq + 1):
    toks[..., s] = np.where(same[..., s], toks[..., s - 1], toks[..., s])
  return jnp.asarray(toks, jnp.int32)


def run_step(kind, tokens):
  """The trainer's step on a copy of the initial state (the step donates its input)."""
  _, mesh, steps, state = built(kind)
  with jax.set_mesh(mesh):
    new, metrics = steps.train_step(jax.tree.map(jnp.copy, state), tokens)
  return new, jax.device_get(metrics)


@functools.lru_cache(maxsize=None)
def plain_grad(kind):
  """jit(value_and_grad) of the plain loss of one micro-batch: model logits, sliced to
  the valid ids -> optax cross-entropy -> + moe_aux_weight x the load-balance loss."""
  config, _, steps, _ = built(kind)
  rest_filter = nnx.Not(trainable_filter(config))

  def loss_fn(params, rest, tokens):
    model = nnx.merge(steps.graphdef, params, rest, copy=True)
    logits, aux = model(tokens[:, :-1])
    logits = logits[..., :VALID]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    total = ce + (config.moe_aux_weight * aux["load_balance_loss"] if aux else 0.0)
    return total, (ce, logits, aux, nnx.state(model, rest_filter))

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def reference_step(kind, tokens):
  """(NpVelvet after one step, its logged scalars, the loss, the entropy, the MoE
  balance loss, the gradient-free state) of the plain computation."""
  _, mesh, _, state = built(kind)
  grad_fn = plain_grad(kind)
  params, rest = state.params, state.rest
  grads, losses, entropies, balance = None, [], [], []
  with jax.set_mesh(mesh):
    for micro in tokens:  # the gradient-free state carries over, micro-batch to micro-batch
      (_, (ce, logits, aux, rest)), g = grad_fn(params, rest, micro)
      g = [np.asarray(x, np.float64) for x in jax.tree.leaves(g)]
      grads = g if grads is None else [a + b for a, b in zip(grads, g)]
      z = np.asarray(logits, np.float64)
      logp = z - z.max(-1, keepdims=True)
      logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
      losses.append(float(ce))
      entropies.append(float(-(np.exp(logp) * logp).sum(-1).mean()))
      balance.append(float(aux["load_balance_loss"]) if aux else None)
  grads = [g / len(tokens) for g in grads]  # the mean of the micro-batch gradients
  loss, entropy = float(np.mean(losses)), float(np.mean(entropies))
  ref = NpVelvet(jax.tree.leaves(params), lr=OPTIM.lr, b1=OPTIM.b1, b2=OPTIM.b2,
                 eps=OPTIM.eps, wd=OPTIM.weight_decay, max_norm=OPTIM.max_grad_norm,
                 vocab=VALID)
  logged = ref.step(grads, loss=loss, entropy=entropy)
  moe = None if balance[0] is None else float(np.mean(balance))
  return ref, logged, loss, entropy, moe, rest


def velvet_state(opt_state):
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, VelvetState)) if isinstance(s, VelvetState))


def assert_close(got, want, what, rel_to_max):
  """Leaf by leaf, to `rel_to_max` x the largest |value| of `want` (fp32 against float64:
  an entry whose gradient is rounding noise, e.g. the key bias's, has no digits to
  compare), and to 1e-4 relative."""
  want = [np.asarray(w, np.float64) for w in want]
  atol = rel_to_max * max([float(np.abs(w).max(initial=0.0)) for w in want], default=0.0)
  got = jax.tree.leaves(got)
  assert len(got) == len(want), what
  for i, (a, b) in enumerate(zip(got, want)):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=1e-4, atol=atol,
                               err_msg=f"{what}, leaf {i}")


def start_params(kind):
  return [np.asarray(p, np.float64) for p in jax.tree.leaves(built(kind)[3].params)]


def update(new, start):
  """The step's change of each parameter leaf."""
  return [np.asarray(p, np.float64) - s for p, s in zip(jax.tree.leaves(new.params), start)]


def assert_step_matches(kind, tokens, new, metrics):
  ref, logged, loss, entropy, moe, rest = reference_step(kind, tokens)
  assert float(metrics["loss"]) == pytest.approx(loss, rel=2e-6)
  assert float(metrics["entropy"]) == pytest.approx(entropy, rel=2e-6)
  assert float(metrics["grad_norm"]) == pytest.approx(logged["grad_norm"], rel=1e-4)
  for key in ("entropy_scale", "perplexity_scale", "learning_rate", "b1"):
    assert float(metrics[key]) == pytest.approx(logged[key], rel=1e-5), key
  if moe is not None:
    assert float(metrics["moe_balance_loss"]) == pytest.approx(moe, rel=1e-5)
  assert bool(metrics["finite"]) and int(new.step) == 1
  state = velvet_state(new.opt_state)
  # each weight moves by up to ~lr: 2e-3 of that is 0.2% of a step
  start = start_params(kind)
  assert_close(update(new, start), [p - s for p, s in zip(ref.p, start)],
               f"{kind} update", 2e-3)
  assert_close(state.mu, ref.m, f"{kind} first moment", 1e-5)
  assert_close(state.nu, ref.v, f"{kind} second moment", 1e-8)
  assert_close(new.rest, jax.tree.leaves(rest), f"{kind} gradient-free state", 1e-6)
  return logged


@pytest.mark.parametrize("kind", list(KINDS))
def test_step_equals_the_plain_computation(kind):
  """One step of grad_accum=2: the mean of the two micro-batches' gradients (each with
  its own MoE aux loss; the gradient-free state carried from one to the next) through
  Velvet with the step's loss and entropy."""
  tokens = batch(1, 2, 2, 24)
  new, metrics = run_step(kind, tokens)
  logged = assert_step_matches(kind, tokens, new, metrics)
  # Velvet's scales are the formula's for the logged signals, inside the band
  es, ps = np_scales(float(metrics["loss"]), float(metrics["entropy"]), vocab=VALID)
  assert float(metrics["entropy_scale"]) == pytest.approx(es, rel=1e-5)
  assert float(metrics["perplexity_scale"]) == pytest.approx(ps, rel=1e-5)
  for scale in (logged["entropy_scale"], logged["perplexity_scale"]):
    assert 0.72 < scale < 1.28 and abs(scale - 1.0) > 0.05, logged
  # the entropy scale follows the entropy, not the loss: they differ by over 1 nat here
  assert float(metrics["loss"]) - float(metrics["entropy"]) > 1.0


def test_grad_accum_equals_one_batch_of_twice_the_size():
  """Where no gradient-free state changes between micro-batches (a dense FFN) and the
  loss is a mean over tokens, two accumulated micro-batches of 2 rows are one batch of
  4 rows: the same loss, entropy, gradient norm, scales, parameters and moments."""
  tokens = batch(1, 2, 2, 24)
  a, ma = run_step("dense", tokens)
  b, mb = run_step("dense", tokens.reshape(1, 4, 25))
  for key in ("loss", "entropy", "grad_norm", "entropy_scale", "perplexity_scale"):
    assert float(ma[key]) == pytest.approx(float(mb[key]), rel=1e-5), key
  sa, sb = velvet_state(a.opt_state), velvet_state(b.opt_state)
  start = start_params("dense")
  for x, y, what, tol in ((update(a, start), update(b, start), "update", 2e-3),
                          (sa.mu, sb.mu, "mu", 1e-5), (sa.nu, sb.nu, "nu", 1e-8)):
    assert_close(x, jax.tree.leaves(y), what, tol)


def test_fused_loss_equals_the_naive_loss_inside_the_step(monkeypatch):
  """train.fused_loss=True (the chunked linear cross-entropy) against fused_loss=False
  and the plain computation. Blocks of 32 tokens x 16 ids make the step's 48 tokens and
  64 ids (60 valid) span several chunks, ragged and partly masked ones included (the
  default blocks, 1024 x 2048, would cover a model this small in one)."""
  from vesperjax import kernels
  real, traced = kernels.linear_cross_entropy, []

  def small_blocks(h, *args, **kwargs):
    traced.append(h.shape)
    return real(h, *args, block_tokens=32, block_vocab=16, **kwargs)

  monkeypatch.setattr(kernels, "linear_cross_entropy", small_blocks)
  config, mesh, _, state = built("dense")
  tokens = batch(1, 2, 2, 24)
  out = {}
  for fused in (True, False):  # new steps (not built()'s): traced with the small blocks
    steps = sharded_steps(config, mesh, optim=OPTIM, max_steps=10, valid_vocab=VALID,
                          fused_loss=fused)
    with jax.set_mesh(mesh):
      new, metrics = steps.train_step(jax.tree.map(jnp.copy, state), tokens)
    out[fused] = new, jax.device_get(metrics)
    assert traced == ([(48, 32)] if fused else []), traced  # the step's [B*S, D] rows
    traced.clear()
  (fused, mf), (naive, mn) = out[True], out[False]
  for key in ("loss", "entropy", "grad_norm", "entropy_scale", "perplexity_scale"):
    assert float(mf[key]) == pytest.approx(float(mn[key]), rel=1e-5), key
  start = start_params("dense")
  assert_close(update(fused, start), update(naive, start), "update", 2e-3)
  assert_close(velvet_state(fused.opt_state).mu, jax.tree.leaves(
      velvet_state(naive.opt_state).mu), "first moment", 1e-5)
  assert_step_matches("dense", tokens, fused, mf)
  assert_step_matches("dense", tokens, naive, mn)
