"""The target platform: precedence, nesting, and the choices that read it."""
import jax
import jax.numpy as jnp
import pytest

from vesperjax import model_preset
from vesperjax.kernels import _dispatch, platform
from vesperjax.kernels import GroupLayout, linear_cross_entropy, rows_matmul


def test_precedence(monkeypatch):
  monkeypatch.delenv(platform.ENV, raising=False)
  assert platform.current() == "cpu"  # the default backend here
  assert platform.resolve(devices=jax.devices()[:2]) == "cpu"
  monkeypatch.setenv(platform.ENV, "gpu")
  assert platform.current() == "cuda"  # the environment beats the default backend
  assert platform.resolve(devices=jax.devices()) == "cuda"  # ... and the devices
  assert platform.resolve("tpu", jax.devices()) == "tpu"  # an explicit value beats all
  assert platform.resolve("auto", jax.devices()) == "cuda"
  with platform.use("rocm"):  # the traced-for platform beats the environment
    assert platform.current() == "rocm"
    with platform.use("cpu"):
      assert platform.current() == "cpu"
    assert platform.current() == "rocm"
  assert platform.current() == "cuda"


def test_bad_names():
  with pytest.raises(ValueError, match="unknown target platform 'metal'"):
    platform.normalize("metal")
  with pytest.raises(ValueError):
    with platform.use("cuda11"):
      pass


def test_traced_for_wraps_tracing_only():
  seen = []

  @jax.jit
  def f(x):
    seen.append(platform.current())
    return x + 1

  g = jax.jit(platform.traced_for("cuda", f.__wrapped__))
  g(jnp.ones(3))
  assert seen == ["cuda"] and platform.current() == "cpu"


def test_choices_follow_the_target():
  config = model_preset("tiny", vocab_size=256)
  assert config.compute_dtype() == jnp.float32 and not _dispatch.pallas_gpu_available()
  sizes = jnp.array([3, 5], jnp.int32)
  assert GroupLayout(sizes, 8).impl == "blocked"
  with platform.use("cuda"):
    assert config.compute_dtype() == jnp.bfloat16
    assert _dispatch.pallas_gpu_available()
    assert _dispatch.resolve() == (True, False)  # auto: compiled Pallas, no interpreter
    assert GroupLayout(sizes, 8).impl == "tokamax"  # installed with the test extra
  with platform.use("tpu"):
    assert config.compute_dtype() == jnp.bfloat16
    assert GroupLayout(sizes, 8).impl == "blocked"  # ragged_dot: a dense weight gradient on TPU
    assert _dispatch.resolve() == (False, False)  # no Pallas GPU backend there


def test_rows_matmul_copies_x_transposed_on_cpu_only():
  x = jax.ShapeDtypeStruct((16, 8), jnp.float32)
  w = jax.ShapeDtypeStruct((8, 4), jnp.float32)

  def jaxpr(target):  # the backward is traced inside the block too, as in a train step
    with platform.use(target):
      grad = jax.grad(lambda x, w: rows_matmul(x, w).sum(), argnums=(0, 1))
      return str(jax.make_jaxpr(grad)(x, w))

  assert "optimization_barrier" in jaxpr("cpu")
  assert "optimization_barrier" not in jaxpr("cuda")


def test_cross_entropy_keeps_logits_on_cpu_only():
  h = jax.ShapeDtypeStruct((64, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((128, 32), jnp.float32)
  labels = jax.ShapeDtypeStruct((64,), jnp.int32)

  def jaxpr(target):
    def loss(h, w, labels):
      with platform.use(target):
        return linear_cross_entropy(h, w, labels, impl="chunked")[0].sum()
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, w, labels))

  # the kept logits tiles are scan outputs of shape [token chunks, vocab chunks, bn, bv]
  assert "f32[1,1,64,128]" in jaxpr("cpu")
  assert "f32[1,1,64,128]" not in jaxpr("cuda")
