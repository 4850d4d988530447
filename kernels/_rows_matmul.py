"""`x @ w` over token rows, with the weight gradient in the form the backend runs fastest.

XLA:CPU hands its fast matmul library (YNNPACK) only dots whose lhs contracts its last
axis; the weight gradient `x.T @ dy` of a [tokens, k] x falls back to a slower one (Eigen)
unless x.T is materialised first. Other backends get the plain gradient. The choice is
the "rows_matmul_grad" row of `platform.CHOICES`; the timings are in docs/benchmarks.md
(`benchmarks/cpu_matmul_forms.py`).
"""
from __future__ import annotations

import jax

from . import platform


@jax.custom_vjp
def rows_matmul(x_NxK: jax.Array, w_KxF: jax.Array) -> jax.Array:
  """`x @ w` for x [N, K] token rows and w [K, F]; same values and gradients as autodiff
  (on CPU the weight gradient transposes x before the dot)."""
  return x_NxK @ w_KxF


def _rows_matmul_fwd(x_NxK, w_KxF):
  return x_NxK @ w_KxF, (x_NxK, w_KxF)


def _rows_matmul_bwd(res, dy_NxF):
  x_NxK, w_KxF = res
  if platform.choice("rows_matmul_grad") == "transpose_first":
    # the barrier keeps XLA from folding the copied x.T back into the dot
    dw_KxF = jax.lax.optimization_barrier(x_NxK.T) @ dy_NxF
  else:
    dw_KxF = x_NxK.T @ dy_NxF
  return (dy_NxF @ w_KxF.T).astype(x_NxK.dtype), dw_KxF.astype(w_KxF.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)
