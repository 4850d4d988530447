"""ERA fused Pallas kernels (interpret mode) vs the pure-JAX reference and its jax.grad."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vesperjax.kernels import _era as era_mod
from vesperjax.kernels import platform
from vesperjax.kernels import era, era_reference


@pytest.mark.parametrize("shape,dtype,block", [
    ((3, 77, 41), jnp.float32, None),   # one block
    ((1000,), jnp.float32, 256),        # several blocks, ragged tail
    ((5, 129), jnp.bfloat16, None),
])
def test_forward_and_grad(shape, dtype, block):
  x = (4 * jax.random.normal(jax.random.key(len(shape)), shape)).astype(dtype)
  f = lambda x: era(x, 0.1, impl="pallas", interpret=True, block_size=block)
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-2, atol=1e-2)
  y = f(x)
  assert y.dtype == dtype and y.shape == shape
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(era_reference(x), np.float32), **tol)
  dy = jax.random.normal(jax.random.key(9), shape).astype(dtype)
  g = jax.vjp(f, x)[1](dy)[0]
  gr = jax.vjp(era_reference, x)[1](dy)[0]
  assert g.dtype == dtype
  np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(gr, np.float32),
                             rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                             atol=1e-5 if dtype == jnp.float32 else 2e-2)


def test_traced_gamma_gradient_and_extremes():
  x = jnp.array([-80.0, -20.0, -3.0, -1e-3, 0.0, 1e-3, 2.5, 20.0, 80.0])
  gamma = jnp.float32(0.3)
  f = jax.jit(lambda x, g: jnp.sum(jnp.sin(era(x, g, impl="pallas", interpret=True))))
  r = lambda x, g: jnp.sum(jnp.sin(era_reference(x, g)))
  np.testing.assert_allclose(f(x, gamma), r(x, gamma), rtol=1e-6)
  gx, gg = jax.grad(f, argnums=(0, 1))(x, gamma)
  rx, rg = jax.grad(r, argnums=(0, 1))(x, gamma)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gg, rg, rtol=1e-5)
  assert np.all(np.isfinite(gx))


def test_auto_is_reference_on_cpu(monkeypatch):
  called = []
  monkeypatch.setattr(era_mod, "_era_pallas", lambda *a: called.append(1))
  x = jnp.linspace(-3, 3, 10)
  np.testing.assert_array_equal(era(x), era_reference(x))
  assert not called


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_era_gated_matches_autodiff_of_reference(dtype, tol):
  """The GLU's ERA(g) * u: hand-derived backward vs jax.grad of the reference product."""
  kg, ku, kd = jax.random.split(jax.random.key(3), 3)
  g = (4 * jax.random.normal(kg, (64, 96))).astype(dtype)
  g = g.at[0, :6].set(jnp.array([-80.0, -20.0, 0.0, 1e-3, 20.0, 80.0], dtype))
  u = jax.random.normal(ku, (64, 96)).astype(dtype)
  dy = jax.random.normal(kd, (64, 96)).astype(dtype)
  ref = lambda g, u: era_reference(g, 0.2) * u
  y, vjp = jax.vjp(lambda g, u: era_mod.era_gated(g, u, 0.2), g, u)
  y_ref, vjp_ref = jax.vjp(ref, g, u)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("block,interpret,match", [
    (100, True, "block_size must be a power of two >= 128"),
    (64, True, "block_size must be a power of two >= 128"),
    (0, True, "block_size must be a power of two >= 128"),
    (1 << 21, False, "block_size=2097152 exceeds Triton's limit"),
])
def test_block_size_is_validated(block, interpret, match):
  x = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  fn = lambda x, interpret: era(x, impl="pallas", interpret=interpret, block_size=block)
  with platform.use("cuda"):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda x: fn(x, interpret), x)
    if not interpret:  # interpret mode has no Triton limit
      jax.eval_shape(lambda x: fn(x, True), x)
