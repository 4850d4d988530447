"""ERA activation, ERA(x) = GELU_tanh(x) + gamma * softplus(x), fused forward and backward.

The forward kernel reads x once and writes y once; the backward kernel reads (x, dy) once
and writes dx = dy * ERA'(x) once (instead of autodiff's chain of elementwise ops and
saved intermediates). gamma is a kernel input, not a constant: a traced gamma gets its
gradient ``sum(dy * softplus(x))`` (one XLA-fused reduction, dropped under jit when gamma
is a constant). Math in fp32, outputs in x's dtype.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _dispatch

_C = math.sqrt(2.0 / math.pi)
_K = 0.044715
_GPU_BLOCK = 2048
_INTERPRET_MAX_BLOCK = 1 << 22
_NUM_SCALARS = 16
MIN_BLOCK = 128  # one element per thread of the kernel's 4 warps


def era_reference(x, gamma=0.1):
  """Pure JAX: jax.nn.gelu(approximate=True) + gamma * softplus, in fp32."""
  xf = x.astype(jnp.float32)
  return (jax.nn.gelu(xf, approximate=True) + gamma * jax.nn.softplus(xf)).astype(x.dtype)


def _softplus(x):
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _fwd_math(x, gamma):
  t = jnp.tanh(_C * (x + _K * x * x * x))
  return 0.5 * x * (1.0 + t) + gamma * _softplus(x)


def _grad_math(x, gamma):
  x2 = x * x
  t = jnp.tanh(_C * (x + _K * x2 * x))
  dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _C * (1.0 + 3.0 * _K * x2)
  return dgelu + gamma / (1.0 + jnp.exp(-x))


def _fwd_kernel(s_ref, x_ref, y_ref):
  y_ref[...] = _fwd_math(x_ref[...].astype(jnp.float32), s_ref[0]).astype(y_ref.dtype)


def _bwd_kernel(s_ref, x_ref, dy_ref, dx_ref):
  x = x_ref[...].astype(jnp.float32)
  dx_ref[...] = (dy_ref[...].astype(jnp.float32) * _grad_math(x, s_ref[0])).astype(
      dx_ref.dtype)


def _elementwise_call(kernel, scalars, arrays, out_dtype, interpret, block_size, name):
  """One 1-D pallas_call `name` over the flattened, block-padded arrays; x-shaped out."""
  shape, n = arrays[0].shape, arrays[0].size
  if block_size is None:
    block_size = (min(pl.next_power_of_2(max(n, 128)), _INTERPRET_MAX_BLOCK)
                  if interpret else _GPU_BLOCK)
  pad = -n % block_size
  flat = [jnp.pad(a.reshape(-1), (0, pad)) if pad else a.reshape(-1) for a in arrays]
  blk = pl.BlockSpec((block_size,), lambda i: (i,))
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = _dispatch.triton_params(num_warps=4, num_stages=1)
  out = pl.pallas_call(
      kernel,
      grid=((n + pad) // block_size,),
      in_specs=[pl.BlockSpec((_NUM_SCALARS,), lambda i: (0,))] + [blk] * len(flat),
      out_specs=blk,
      out_shape=jax.ShapeDtypeStruct((n + pad,), out_dtype),
      interpret=interpret,
      name=name,
      **kwargs,
  )(scalars, *flat)
  return (out[:n] if pad else out).reshape(shape)


def _scalars(gamma):
  g = jnp.asarray(gamma, jnp.float32).reshape(1)
  return jnp.concatenate([g, jnp.zeros((_NUM_SCALARS - 1,), jnp.float32)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _era_pallas(x, gamma, interpret, block_size):
  return _elementwise_call(_fwd_kernel, _scalars(gamma), [x], x.dtype, interpret, block_size,
                           "era_fwd")


def _era_fwd(x, gamma, interpret, block_size):
  return _era_pallas(x, gamma, interpret, block_size), (x, gamma)


def _era_bwd(interpret, block_size, res, dy):
  x, gamma = res
  dx = _elementwise_call(_bwd_kernel, _scalars(gamma), [x, dy], x.dtype, interpret,
                         block_size, "era_bwd")
  xf = x.astype(jnp.float32)
  dgamma = jnp.sum(dy.astype(jnp.float32) * jax.nn.softplus(xf))
  return dx, dgamma.astype(gamma.dtype).reshape(gamma.shape)


_era_pallas.defvjp(_era_fwd, _era_bwd)


def era(x, gamma=0.1, *, impl=None, interpret=None, block_size=None):
  """ERA(x) = GELU_tanh(x) + gamma * softplus(x); fused Pallas fwd/bwd on GPU.

  ``impl``: "auto" | "pallas" | "reference" (see ``_dispatch``). gamma may be a Python
  float or a traced scalar (then it gets a gradient too). ``block_size`` (None: a
  default) must be a power of two >= ``MIN_BLOCK``, and at most Triton's 2^20 elements
  when compiled for a GPU (ValueError otherwise). The kernels are named "era_fwd" and
  "era_bwd" in profiles.
  """
  use_pallas, interpret = _dispatch.resolve(impl, interpret)
  _dispatch.check_block("block_size", block_size, minimum=MIN_BLOCK,
                        compiled=use_pallas and not interpret)
  if not use_pallas or x.size == 0:
    return era_reference(x, gamma)
  gamma = jnp.asarray(gamma, jnp.float32)
  return _era_pallas(x, gamma, interpret, block_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def era_gated(g, u, gamma=0.1):
  """The GLU's ``ERA(g) * u`` with a hand-derived backward that keeps only g and u.

  Autodiff of ``era_reference(g) * u`` saves ERA's intermediates (tanh, exp, the product)
  as well: in a scanned layer stack every one becomes a stacked [layers, tokens, ffn]
  residual written in the forward and read in the backward. Recomputing them from g is
  cheaper on CPU (fwd+bwd of the tiny model: see docs/benchmarks.md). gamma is a
  constant here.
  """
  return era_reference(g, gamma) * u


def _era_gated_fwd(g, u, gamma):
  return era_gated(g, u, gamma), (g, u)


def _era_gated_bwd(gamma, res, dy):
  g, u = res
  gf, dyf = g.astype(jnp.float32), dy.astype(jnp.float32)
  dg = dyf * u.astype(jnp.float32) * _grad_math(gf, gamma)
  du = dyf * era_reference(gf, gamma)
  return dg.astype(g.dtype), du.astype(u.dtype)


era_gated.defvjp(_era_gated_fwd, _era_gated_bwd)
