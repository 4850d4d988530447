"""Linear cross-entropy (chunked jnp and Pallas-interpret paths) vs the naive reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.kernels import _cross_entropy as ce
from vesperjax.kernels import platform


def _inputs(key, n, v, d, dtype, valid=None):
  k1, k2, k3 = jax.random.split(key, 3)
  h = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
  w = (0.5 * jax.random.normal(k2, (v, d), jnp.float32)).astype(dtype)
  labels = jax.random.randint(k3, (n,), 0, valid or v)
  labels = labels.at[::7].set(-1)  # ignored tokens
  return h, w, labels


def _objective(fn, **kw):
  def f(h, w, labels, cl, ce_):
    loss, ent = fn(h, w, labels, **kw)
    return jnp.sum(cl * loss) + jnp.sum(ce_ * ent)
  return f


@pytest.mark.parametrize("impl", ["chunked", "chunked-recompute", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_grads(impl, dtype):
  n, v, d, valid = 77, 301, 40, 290  # none a multiple of the blocks
  key = jax.random.key(0 if dtype == jnp.float32 else 1)
  h, w, labels = _inputs(key, n, v, d, dtype, valid)
  kw = dict(valid_vocab=valid)
  if impl.startswith("chunked"):  # backward from the kept logits, or recomputing them
    kw["keep_logits"] = impl == "chunked"
    impl = "chunked"
  blocks = dict(block_tokens=32, block_vocab=128)
  if impl == "pallas":
    blocks = dict(block_tokens=64, block_vocab=256)  # few grid steps in interpret mode
  fwd = jax.jit(lambda h, w: ce.linear_cross_entropy(h, w, labels, impl=impl, interpret=True,
                                                     **blocks, **kw))
  loss, ent = fwd(h, w)
  ref_kw = dict(valid_vocab=valid)
  rl, re = ce.linear_cross_entropy_reference(h, w, labels, **ref_kw)
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(loss, rl, **tol)
  np.testing.assert_allclose(ent, re, **tol)
  assert np.all(np.asarray(loss)[::7] == 0)
  # cotangents on both outputs: entropy gradients are exact too
  cl, ce_ = jax.random.normal(jax.random.key(5), (2, n))
  args = (h, w, labels, cl, ce_)
  g = jax.jit(jax.grad(_objective(ce.linear_cross_entropy, impl=impl, interpret=True, **blocks, **kw),
               argnums=(0, 1)))(*args)
  gr = jax.grad(_objective(ce.linear_cross_entropy_reference, **ref_kw),
                argnums=(0, 1))(*args)
  for a, b in zip(g, gr):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if dtype == jnp.float32:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    else:  # bf16 outputs: compare relative to the gradient's scale
      assert np.max(np.abs(a - b)) <= 2e-2 * np.max(np.abs(b))
  # padded vocab rows get no gradient
  assert np.all(np.asarray(g[1], np.float32)[valid:] == 0)


def test_loss_only_grad_matches_and_jits():
  h, w, labels = _inputs(jax.random.key(2), 50, 97, 24, jnp.float32)
  f = jax.jit(jax.value_and_grad(
      lambda h, w: jnp.mean(ce.linear_cross_entropy(h, w, labels, block_tokens=16,
                                                    block_vocab=32)[0]), argnums=(0, 1)))
  r = jax.value_and_grad(
      lambda h, w: jnp.mean(ce.linear_cross_entropy_reference(h, w, labels)[0]), argnums=(0, 1))
  (l1, g1), (l0, g0) = f(h, w), r(h, w)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_dispatch_cpu_default_is_chunked_and_reference_switch(monkeypatch):
  h, w, labels = _inputs(jax.random.key(3), 9, 33, 8, jnp.float32)
  called = []
  monkeypatch.setattr(ce, "_fwd_pallas", lambda *a: called.append(1))
  out = ce.linear_cross_entropy(h, w, labels)
  ref = ce.linear_cross_entropy(h, w, labels, impl="reference")
  np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
  assert not called
  with pytest.raises(ValueError):
    ce.linear_cross_entropy(h, w[:, :4], labels)


def _abstract(n=256, v=1024, d=64, dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d), dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32))


@pytest.mark.parametrize("impl,kw,match", [
    ("pallas", dict(block_tokens=48), "block_tokens must be a power of two"),
    ("pallas", dict(block_vocab=8), "block_vocab must be a power of two >= 16"),
    ("pallas", dict(block_tokens=0), "block_tokens must be a positive integer"),
    ("chunked", dict(block_vocab=-4), "block_vocab must be a positive integer"),
])
def test_block_sizes_are_validated(impl, kw, match):
  fn = lambda h, w, l: ce.linear_cross_entropy(h, w, l, impl=impl, interpret=True, **kw)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(fn, *_abstract())


def test_chunked_blocks_need_not_be_powers_of_two():
  jax.eval_shape(lambda h, w, l: ce.linear_cross_entropy(
      h, w, l, impl="chunked", block_tokens=48, block_vocab=1000), *_abstract())


@pytest.mark.parametrize("bn,bv,match", [
    (1024, 2048, r"block_tokens \* block_vocab = 1024 \* 2048 exceeds Triton's 1048576"),
    (1024, 1024, "shared memory"),  # the 2^20-element tile fits; its h/w tiles do not
])
def test_compiled_pallas_blocks_must_fit_triton(bn, bv, match):
  fn = lambda h, w, l, interpret: ce.linear_cross_entropy(
      h, w, l, impl="pallas", interpret=interpret, block_tokens=bn, block_vocab=bv)
  args = _abstract(4096, 32768, 2048)
  with platform.use("cuda"):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda *a: fn(*a, interpret=False), *args)
    jax.eval_shape(lambda *a: fn(*a, interpret=True), *args)  # no Triton limits there
