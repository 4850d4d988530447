"""Attention dispatch: XLA, blocked, tokamax (its XLA path on CPU) and splash (the Mosaic
TPU kernel in Pallas's interpreter on CPU) vs naive attention."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.kernels import _attention as att
from vesperjax.kernels import _dispatch
from vesperjax.kernels import platform


def _qkv(shape, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(sum(shape)), 3)
  return [jax.random.normal(k, shape, jnp.float32).astype(dtype) for k in ks]


def _value_and_grads(fn, q, k, v, cot):
  """fn's output and the gradients (dq, dk, dv) of sum(output * cot), all as fp32."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)
  out = jax.jit(fn)(q, k, v)
  return [np.asarray(x, np.float32)
          for x in (out, *jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v))]


def _numpy_attention(q, k, v, causal):
  """Float64 numpy softmax(q k^T / sqrt(D)) v for one [S, H, D] example."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    sq, sk = q.shape[0], k.shape[0]
    s = np.where(np.arange(sq)[:, None] + (sk - sq) >= np.arange(sk)[None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("seq,auto", [(24, "reference"), (96, "blocked")])
@pytest.mark.parametrize("causal", [True, False])
def test_each_implementation_matches_numpy(causal, seq, auto):
  """Every CPU path, the default (None: the platform's choice) included, against the
  float64 numpy attention of each example; at 96 positions the default is not the
  reference (blocked, for causal self-attention), so it is not compared with itself."""
  q, k, v = _qkv((2, seq, 3, 16))
  want = np.stack([_numpy_attention(q[b], k[b], v[b], causal) for b in range(2)])
  assert att._choose(q, k, v) == auto  # pylint: disable=protected-access
  for impl in (None, "xla", "reference", "blocked"):
    if impl == "blocked" and not causal:
      continue  # causal self-attention only
    np.testing.assert_allclose(att.attention(q, k, v, causal, impl), want, rtol=2e-5,
                               atol=2e-5, err_msg=str(impl))


# fp32: the same fp32 math in another order (CPU dots are exact fp32), so a few ulps.
# bf16: both round the probabilities to bf16 before the PV matmul and the output to bf16;
# outputs and gradients here reach magnitude ~4, where one bf16 ulp is 2^-6 ~ 0.016: an
# element rounded the other way differs by one such ulp; the tolerances allow about two
# (atol) plus 1% (rtol, ~2.5 bf16 ulps of 2^-8 relative).
TOLERANCES = {jnp.float32: dict(rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5),
              jnp.bfloat16: dict(rtol=1e-2, atol=2e-2, grad_rtol=1e-2, grad_atol=2e-2)}


# tokamax: its XLA path on CPU; splash: the Mosaic TPU kernel in Pallas's interpreter
# (compiled by libtpu in the TPU step tests), S = 256 as two 128 blocks
KERNEL_SHAPES = {"tokamax": (2, 32, 2, 16), "splash": (2, 256, 2, 32)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("impl", ["tokamax", "splash"])
def test_kernel_matches_reference_values_and_grads(impl, causal, dtype):
  """tokamax and splash against the naive reference: output, dq, dk, dv."""
  if impl == "tokamax" and not att.tokamax_available():
    pytest.skip("tokamax not installed (the gpu extra)")
  q, k, v = _qkv(KERNEL_SHAPES[impl], dtype)
  cot = jax.random.normal(jax.random.key(7), q.shape)
  tol = TOLERANCES[dtype]
  got = _value_and_grads(lambda q, k, v: att.attention(q, k, v, causal, impl), q, k, v, cot)
  want = _value_and_grads(lambda q, k, v: att.attention_reference(q, k, v, causal), q, k, v, cot)
  np.testing.assert_allclose(got[0], want[0], rtol=tol["rtol"], atol=tol["atol"])
  for name, a, b in zip(("dq", "dk", "dv"), got[1:], want[1:]):
    np.testing.assert_allclose(a, b, rtol=tol["grad_rtol"], atol=tol["grad_atol"], err_msg=name)
  assert np.abs(want[1]).max() > 0.1  # the gradients compared are not all ~0


@pytest.mark.parametrize("causal,q_len,k_len", [(True, [32, 19], [32, 19]),
                                                (False, [32, 11], [25, 7])])
def test_ragged_lengths_match_truncated_attention(causal, q_len, k_len):
  """Each example equals attention over its own prefix (numpy, float64); rows past the
  query length are zero; the XLA and (when installed) tokamax paths match, gradients too."""
  q, k, v = _qkv((2, 32, 2, 16))
  lengths = dict(query_lengths=jnp.array(q_len), key_lengths=jnp.array(k_len))
  ref = np.asarray(att.attention_reference(q, k, v, causal, **lengths))
  for b, (lq, lk) in enumerate(zip(q_len, k_len)):
    np.testing.assert_allclose(ref[b, :lq], _numpy_attention(q[b, :lq], k[b, :lk], v[b, :lk],
                                                             causal), rtol=1e-5, atol=1e-5)
    assert not ref[b, lq:].any()
  cot = jax.random.normal(jax.random.key(3), q.shape)
  want = _value_and_grads(lambda q, k, v: att.attention_reference(q, k, v, causal, **lengths),
                          q, k, v, cot)
  assert not want[2][1, k_len[1]:].any()  # keys past the length get no gradient
  impls = ["xla"] + (["tokamax"] if att.tokamax_available() else [])
  for impl in impls:
    got = _value_and_grads(lambda q, k, v, impl=impl: att.attention(q, k, v, causal, impl,
                                                                    **lengths), q, k, v, cot)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{impl} {name}")


def test_splash_honours_ragged_lengths():
  """Per-row lengths as segment ids: each row equals attention over its own prefix, rows
  past the length are zero, and keys past it get no gradient, as the reference."""
  q, k, v = _qkv((3, 128, 2, 16))
  lengths = dict(query_lengths=jnp.array([128, 77, 1]), key_lengths=jnp.array([128, 77, 1]))
  cot = jax.random.normal(jax.random.key(9), q.shape)
  got = _value_and_grads(lambda q, k, v: att.attention(q, k, v, True, "splash", **lengths),
                         q, k, v, cot)
  want = _value_and_grads(lambda q, k, v: att.attention_reference(q, k, v, True, **lengths),
                          q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  assert not got[0][1, 77:].any() and not got[2][2, 1:].any()


def test_splash_is_the_tpu_choice_where_its_blocks_fit():
  """TPU: splash for self-attention whose length is a multiple of 128, blocked for the
  rest (S = 96), XLA for cross-attention; splash asked for at S = 96 is one error."""
  spec = lambda s: jax.ShapeDtypeStruct((1, s, 2, 64), jnp.bfloat16)
  with platform.use("tpu"):
    assert att.attention_implementation(spec(2048), spec(2048), spec(2048)) == "splash"
    assert att.attention_implementation(spec(384), spec(384), spec(384)) == "splash"
    assert att.attention_implementation(spec(96), spec(96), spec(96)) == "blocked"
    assert att.attention_implementation(spec(256), spec(128), spec(128)) == "xla"
  q = jnp.zeros((1, 96, 2, 16))
  with pytest.raises(ValueError, match="multiple of 128"):
    att.attention(q, q, q, True, "splash")


@pytest.mark.parametrize("seq,block", [(100, 64), (256, None), (48, 16)])
def test_blocked_matches_reference_values_and_grads(seq, block):
  """Query blocks against key prefixes, including a ragged last block."""
  q, k, v = _qkv((2, seq, 3, 16))
  cot = jax.random.normal(jax.random.key(seq), q.shape)
  ref = lambda q, k, v: jnp.sum(att.attention_reference(q, k, v) * cot)
  got = lambda q, k, v: jnp.sum(att.attention_blocked(q, k, v, block=block) * cot)
  np.testing.assert_allclose(att.attention_blocked(q, k, v, block=block),
                             att.attention_reference(q, k, v), rtol=2e-5, atol=2e-5)
  for a, b in zip(jax.jit(jax.grad(got, (0, 1, 2)))(q, k, v),
                  jax.grad(ref, (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_choice_table_on_cpu():
  q, k, v = _qkv((1, 16, 1, 8), jnp.bfloat16)
  assert att.cudnn_supported(q, k, v)
  # no CUDA: blocked causal self-attention measured fastest on CPU; short or cross: einsum
  assert att._choose(q, k, v) == "reference"
  q, k, v = _qkv((1, 128, 1, 8))
  assert att._choose(q, k, v) == "blocked"
  assert att._choose(q, k[:, :64], v[:, :64]) == "reference"
  with pytest.raises(ValueError):
    att.attention(q, k, v, True, "flash")
  with pytest.raises(ValueError):
    att.attention(q, k, v, True, "pallas")  # the deprecated jax.experimental ops are gone


def test_choice_table_on_cuda(monkeypatch):
  """cuDNN where it applies, then tokamax where installed, then XLA."""
  spec = lambda d, dtype: jax.ShapeDtypeStruct((1, 256, 2, d), dtype)
  monkeypatch.setattr(att, "tokamax_available", lambda: True)
  with platform.use("cuda"):
    assert att._choose(*[spec(128, jnp.bfloat16)] * 3) == "cudnn"
    assert att._choose(*[spec(256, jnp.bfloat16)] * 3) == "tokamax"  # cuDNN: head_dim <= 128
    assert att._choose(*[spec(64, jnp.float32)] * 3) == "tokamax"  # cuDNN: fp16/bf16 only
    monkeypatch.setattr(att, "tokamax_available", lambda: False)
    assert att._choose(*[spec(64, jnp.float32)] * 3) == "xla"


def test_process_default_pallas_means_tokamax(monkeypatch):
  q, k, v = _qkv((1, 128, 1, 8))
  monkeypatch.setattr(_dispatch, "_default_impl", "pallas")
  monkeypatch.setattr(att, "tokamax_available", lambda: True)
  assert att._choose(q, k, v) == "tokamax"
  monkeypatch.setattr(att, "tokamax_available", lambda: False)
  assert att._choose(q, k, v) == "blocked"  # the platform's own choice
  monkeypatch.setattr(_dispatch, "_default_impl", "reference")
  assert att._choose(q, k, v) == "reference"


def test_missing_tokamax_is_one_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # import tokamax raises ImportError
  q, k, v = _qkv((1, 8, 1, 8))
  with pytest.raises(ValueError) as info:
    att.attention(q, k, v, True, "tokamax")
  message = str(info.value)
  assert "\n" not in message and "pip install 'vesperjax[gpu]'" in message


def test_tokamax_is_imported_lazily():
  code = ("import sys; import vesperjax.kernels as k; from vesperjax.kernels import _attention;"
          "import vesperjax.config; assert 'tokamax' not in sys.modules, 'tokamax imported'")
  subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
