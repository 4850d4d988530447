"""XLA:CPU costs behind the model's matmul forms (docs/benchmarks.md, "The measurement behind each CPU choice").

1. A linear layer's fwd+bwd on [batch, seq, d] activations against the same rows
   flattened to [tokens, d] (`layers.flat_tokens`): the 3-D weight gradient contracts
   two axes, and XLA:CPU transposes the cotangent for it.
2. The MoE blocked layout's weight gather ([groups, k, n] -> [blocks, k, n]): default
   fill mode, clip mode (`_take_blocks` in kernels/_grouped_matmul.py), and transposed
   weights.
3. The FFN down projection's weight gradient `x.T @ dy`: as written (XLA:CPU runs it on
   Eigen) and with x.T materialised first, as `vesperjax.kernels.rows_matmul` does on
   CPU (the dot then goes to YNNPACK). Session 4.
4. MoE grouped matmuls: `jax.lax.ragged_dot` over 4 groups against the one dense dot of
   the same rows (XLA:CPU computes every group over all rows), and tiny-moe's MoE layer
   (blocked layout, fwd+bwd, 2,048 tokens x top-2) against a dense GLU FFN over its
   4,096 assignments: the floor of a grouped matmul without padding or weight copies.

  python benchmarks/cpu_matmul_forms.py
"""
from vesperjax.host_memory import keep_freed_memory

keep_freed_memory()  # as under `python -m vesperjax.*` (see vesperjax/host_memory.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vesperjax.kernels.bench import median_seconds  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 256, 272)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(272, 1024)) * 0.05, jnp.float32)
  loss_3d = lambda x, w: jnp.sum(jnp.sin(x @ w))
  loss_rows = lambda x, w: jnp.sum(jnp.sin(x.reshape(-1, x.shape[-1]) @ w))
  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1)))

  experts = jnp.asarray(rng.normal(size=(4, 272, 1024)), jnp.float32)
  blocks = jnp.asarray(np.sort(rng.integers(0, 4, 20)), jnp.int32)
  h = jnp.asarray(rng.normal(size=(2048, 1024)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(2048, 256)), jnp.float32)
  rows = [
      ("linear fwd+bwd, [8, 256, 272] @ [272, 1024]", grad(loss_3d), (x, w)),
      ("linear fwd+bwd, [2048, 272] rows @ [272, 1024]", grad(loss_rows), (x, w)),
      ("gather [4, 272, 1024] -> 20 blocks, fill mode",
       jax.jit(lambda w, b: w[b]), (experts, blocks)),
      ("gather, clip mode",
       jax.jit(lambda w, b: jnp.take(w, b, axis=0, mode="clip")), (experts, blocks)),
      ("gather, transposed weights",
       jax.jit(lambda w, b: jnp.swapaxes(w, 1, 2)[b]), (experts, blocks)),
      ("weight grad [2048, 1024]^T @ [2048, 256], x.T @ dy",
       jax.jit(lambda x, d: x.T @ d), (h, dy)),
      ("weight grad, x.T materialised first (rows_matmul)",
       jax.jit(lambda x, d: jax.lax.optimization_barrier(x.T) @ d), (h, dy)),
  ]
  rows += moe_rows(rng)
  print(f"jax {jax.__version__}, {jax.default_backend()}, median of 30 calls")
  print(f"| {'case':50s} | ms |\n|{'-' * 52}|----|")
  for name, fn, args in rows:
    print(f"| {name:50s} | {1e3 * median_seconds(fn, *args, reps=30):.1f} |")


def moe_rows(rng):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vesperjax.config import model_preset  # pylint: disable=g-import-not-at-top
  from vesperjax.kernels import rows_matmul  # pylint: disable=g-import-not-at-top
  from vesperjax.model.moe import MoE  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(rng.normal(size=(4096, 272)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(4, 272, 1024)) * 0.05, jnp.float32)
  sizes = jnp.asarray([1000, 1100, 996, 1000], jnp.int32)
  graphdef, state = nnx.split(MoE(model_preset("tiny-moe"), nnx.Rngs(0)))
  tokens = jnp.asarray(rng.normal(size=(2048, 256)), jnp.float32)

  def moe_loss(state, tokens):
    y, aux = nnx.merge(graphdef, state)(tokens)
    return jnp.sum(jnp.sin(y)) + aux["load_balance_loss"]

  def ffn_loss(ws, x):  # the GLU FFN of the same widths, FlyLoRA's rank in its inputs
    gate, up, down = ws
    h = jax.nn.silu(rows_matmul(x, gate)) * rows_matmul(x, up)
    return jnp.sum(jnp.sin(rows_matmul(h, down)))

  ffn = (w[0], w[1], jnp.asarray(rng.normal(size=(1024, 256)) * 0.05, jnp.float32))
  return [
      ("ragged_dot [4096, 272] x [4, 272, 1024]",
       jax.jit(jax.lax.ragged_dot), (x, w, sizes)),
      ("one dense dot [4096, 272] @ [272, 1024]", jax.jit(lambda x, w: x @ w[0]), (x, w)),
      ("tiny-moe MoE layer fwd+bwd, 2048 tokens (blocked)",
       jax.jit(jax.grad(moe_loss, argnums=(0, 1))), (state, tokens)),
      ("dense GLU FFN fwd+bwd over its 4096 assignments",
       jax.jit(jax.grad(ffn_loss, argnums=(0, 1))), (ffn, x)),
  ]


if __name__ == "__main__":
  main()
