"""The model's attention against float64 numpy written from the definitions: split-half
(GPT-NeoX) RoPE as a complex rotation of the pairs (x_i, x_{i + Dh/2}) by
position * theta^(-2i/Dh), and causal multi-head attention softmax(q k^T / sqrt(Dh)) v
with the qkv and output projections and their biases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vesperjax as vj
from vesperjax.model.attention import Attention, rope

THETA = 500.0  # not the default, so a theta that is not passed through shows


def np_rope(x, positions, theta):
  """x [B, S, H, Dh] rotated: the pair (x_i, x_{i+half}) as x_i + 1j x_{i+half}, times
  exp(1j * position * theta^(-2i/Dh))."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  freq = theta ** (-2.0 * np.arange(half) / x.shape[-1])
  angle = np.asarray(positions, np.float64)[:, :, None, None] * freq  # [B, S, 1, half]
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)
  return np.concatenate([z.real, z.imag], -1)


def np_attention_module(x, positions, w, theta):
  """The attention layer: projections, RoPE on q and k, causal softmax per head, output
  projection. w: the module's arrays as float64 numpy."""
  x = np.asarray(x, np.float64)
  qkv = np.einsum("bsd,dthk->bsthk", x, w["qkv_kernel"]) + w["qkv_bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, S, H, Dh]
  q, k = np_rope(q, positions, theta), np_rope(k, positions, theta)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  n = x.shape[1]
  s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)  # key j <= query i
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", p, v)
  return np.einsum("bqhd,hde->bqe", out, w["out_kernel"]) + w["out_bias"]


def layer(impl, seed=0):
  cfg = vj.ModelConfig(vocab_size=64, hidden_size=48, num_layers=1, num_heads=3,
                       ffn_size=64, max_seq_len=128, rope_theta=THETA, attention_impl=impl)
  attn = Attention(cfg, nnx.Rngs(seed))
  keys = jax.random.split(jax.random.key(seed + 1), 4)
  # weights large enough for peaked attention, biases non-zero (they start at zero)
  for name, key, std in zip(("qkv_kernel", "qkv_bias", "out_kernel", "out_bias"), keys,
                            (0.3, 0.5, 0.2, 0.5)):
    var = getattr(attn, name)
    var[...] = std * jax.random.normal(key, var.shape)
  return attn


def test_rope_matches_the_complex_rotation():
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
  positions = jnp.stack([jnp.arange(9), jnp.arange(9) * 7 + 100])  # offsets, big angles
  got = np.asarray(rope(x, positions, THETA), np.float64)
  np.testing.assert_allclose(got, np_rope(x, positions, THETA), rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(rope(x, jnp.zeros_like(positions), THETA)), x)
  # a rotation: norms kept, and q . k depends only on the distance between positions
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1),
                             np.linalg.norm(np.asarray(x, np.float64), axis=-1), rtol=1e-5)
  q, k = x[:1, :1], x[1:, 1:2]
  dot = lambda m, n: float(np.sum(np.asarray(rope(q, jnp.full((1, 1), m), THETA)) *
                                  np.asarray(rope(k, jnp.full((1, 1), n), THETA))))
  assert dot(3, 10) == pytest.approx(dot(103, 110), rel=1e-4, abs=1e-5)
  assert dot(3, 10) != pytest.approx(dot(3, 11), rel=1e-2)


@pytest.mark.parametrize("impl,seq", [(None, 12), (None, 80), ("xla", 80), ("reference", 80)])
def test_attention_module_matches_numpy(impl, seq):
  """The module with each attention path (None at 80 positions: the CPU's blocked
  attention), batch rows at different position offsets."""
  attn = layer(impl)
  x = jax.random.normal(jax.random.key(5), (2, seq, 48))
  positions = jnp.stack([jnp.arange(seq), jnp.arange(seq) + 37])
  got, cache = nnx.jit(lambda m, x, p: m(x, p))(attn, x, positions)
  assert cache is None and got.shape == x.shape and got.dtype == jnp.float32
  w = {n: np.asarray(getattr(attn, n)[...], np.float64)
       for n in ("qkv_kernel", "qkv_bias", "out_kernel", "out_bias")}
  want = np_attention_module(x, positions, w, THETA)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4)
  # causal: the first position sees only itself, so its output is its own value projected
  v0 = np.einsum("bd,dhk->bhk", np.asarray(x[:, 0], np.float64),
                 w["qkv_kernel"][:, 2]) + w["qkv_bias"][2]
  np.testing.assert_allclose(np.asarray(got[:, 0], np.float64),
                             np.einsum("bhk,hke->be", v0, w["out_kernel"]) + w["out_bias"],
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, tensor=2), dict(data=8)],
                         ids=["data2-fsdp2-tensor2", "data8"])
def test_splash_runs_per_shard_under_a_mesh(mesh_shape):
  """A Mosaic kernel XLA cannot partition (splash) runs inside a shard_map over the batch
  axes (and tensor over heads) of the ambient mesh: values and gradients equal the
  reference attention over the whole batch; without a mesh no shard_map is traced."""
  from vesperjax import sharding
  from vesperjax.kernels import attention_reference
  from vesperjax.model.attention import causal_attention
  ks = jax.random.split(jax.random.key(2), 4)
  q, k, v, cot = (jax.random.normal(key, (8, 128, 4, 16)) for key in ks)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * cot)  # noqa: E731
  splash = lambda q, k, v: causal_attention(q, k, v, "splash")  # noqa: E731
  reference = lambda q, k, v: attention_reference(q, k, v, True)  # noqa: E731
  want = [reference(q, k, v), *jax.grad(loss(reference), (0, 1, 2))(q, k, v)]
  assert "shard_map" not in str(jax.make_jaxpr(splash)(q, k, v))
  with jax.set_mesh(sharding.make_mesh(**mesh_shape)):
    assert "shard_map" in str(jax.make_jaxpr(splash)(q, k, v))
    got = [jax.jit(splash)(q, k, v), *jax.jit(jax.grad(loss(splash), (0, 1, 2)))(q, k, v)]
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name)
