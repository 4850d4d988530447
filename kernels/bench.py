"""Roofline table for the kernels: one script, one table.

  python -m vesperjax.kernels.bench                # full sizes (GPU: H100/H200)
  python -m vesperjax.kernels.bench --size tiny    # smoke run (CPU: checks it isn't broken)

Ceilings first (device copy bandwidth, bf16 matmul FLOP rate), then each kernel beside
its alternatives: fused Velvet update vs jitted optax.adamw on an xlarge-shaped tree, ERA
fwd+bwd, linear cross-entropy (time and compiled temp memory) vs naive logits, attention
variants. On CPU the Pallas rows run in interpret mode (numbers meaningless, only proof
that the code runs).
"""
import argparse
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import _dispatch
from . import _attention as att
from . import _cross_entropy as ce
from . import _era as era_mod
from . import _velvet_update as vu

SIZES = {
    # hidden, layers, ffn, vocab | ERA tokens | CE N, V, D | attention B, S, H, D | matmul
    "tiny": dict(hidden=64, layers=2, ffn=176, vocab=512, era_tokens=256,
                 ce=(256, 512, 64), attn=(1, 64, 2, 16), mm=256, copy=1 << 20),
    "full": dict(hidden=2048, layers=24, ffn=5504, vocab=32000, era_tokens=16384,
                 ce=(16384, 32768, 2048), attn=(4, 2048, 16, 128), mm=8192, copy=1 << 28),
}


def median_seconds(fn, *args, reps=10):
  """Median wall time (s) of a jitted call, after compile + warmup."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _temp_mb(fn, *args):
  try:
    m = fn.lower(*args).compile().memory_analysis()
    return (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except
    return float("nan")


class Table:
  def __init__(self):
    self.rows = []
    self.bw = self.flops = None

  def add(self, name, fn, args, *, bytes_=None, flops=None, mem=False, reps=10):
    try:
      t = median_seconds(fn, *args, reps=reps)
      mb = _temp_mb(fn, *args) if mem else float("nan")
      err = ""
    except Exception as e:  # pylint: disable=broad-except
      t, mb, err = float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:60]}"
    gbs = bytes_ / t / 1e9 if bytes_ else float("nan")
    tfs = flops / t / 1e12 if flops else float("nan")
    roof = float("nan")
    if bytes_ and self.bw:
      roof = 100 * gbs / self.bw
    elif flops and self.flops:
      roof = 100 * tfs / self.flops
    self.rows.append((name, t * 1e3, gbs, tfs, roof, mb, err))
    return gbs, tfs

  def print(self):
    print(f"{'benchmark':54s} {'ms':>10s} {'GB/s':>9s} {'TFLOP/s':>8s} {'%roof':>6s} "
          f"{'temp MB':>9s}  note")
    for name, ms, gbs, tfs, roof, mb, err in self.rows:
      f = lambda x, w, p: f"{x:{w}.{p}f}" if x == x else " " * (w - 1) + "-"
      print(f"{name:54s} {f(ms, 10, 3)} {f(gbs, 9, 1)} {f(tfs, 8, 2)} {f(roof, 6, 1)} "
            f"{f(mb, 9, 1)}  {err}")


def _xlarge_tree(cfg, key):
  h, f, v = cfg["hidden"], cfg["ffn"], cfg["vocab"]
  shapes = {"embed": (v, h), "final_ln": (h,)}
  for i in range(cfg["layers"]):
    shapes.update({f"l{i}/qkv": (h, 3 * h), f"l{i}/out": (h, h), f"l{i}/gate": (h, f),
                   f"l{i}/up": (h, f), f"l{i}/down": (f, h), f"l{i}/ln1": (h,),
                   f"l{i}/ln2": (h,)})
  ks = jax.random.split(key, len(shapes))
  return {n: 0.02 * jax.random.normal(k, s) for k, (n, s) in zip(ks, shapes.items())}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", choices=sorted(SIZES), default="full")
  ap.add_argument("--reps", type=int, default=10)
  args = ap.parse_args(argv)
  cfg, reps = SIZES[args.size], args.reps
  gpu = _dispatch.pallas_gpu_available()
  kimpl = "pallas"  # on CPU this means interpret mode
  print("command:", "python -m vesperjax.kernels.bench", shlex.join(sys.argv[1:]))
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, Pallas rows {'compiled' if gpu else 'INTERPRETED (not timings)'}")
  tab = Table()
  key = jax.random.key(0)

  # ceilings
  x = jnp.ones((cfg["copy"],), jnp.float32)
  tab.bw, _ = tab.add("ceiling: copy fp32 (read+write)", jax.jit(lambda x: -x), (x,),
                      bytes_=2 * x.nbytes, reps=reps)
  n = cfg["mm"]
  a = jnp.ones((n, n), jnp.bfloat16)
  _, tab.flops = tab.add(f"ceiling: bf16 matmul {n}^3", jax.jit(jnp.matmul), (a, a),
                         flops=2 * n**3, reps=reps)
  del x, a

  # Velvet / AdamW
  params = _xlarge_tree(cfg, key)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  nparam = sum(p.size for p in jax.tree.leaves(params))
  byt = 28 * nparam  # read p, g, m, v; write update, m, v (fp32)
  tx = optax.adamw(1e-3, weight_decay=1e-3)
  st = tx.init(params)
  step_optax = jax.jit(lambda g, s, p: tx.update(g, s, p)[:2])
  tab.add(f"adamw: optax.adamw update ({nparam / 1e6:.0f}M params)", step_optax,
          (grads, st, params), bytes_=byt, reps=reps)
  del st  # free optax's moments before the fused path allocates its buckets
  mu = jax.tree.map(jnp.zeros_like, params)
  nu = jax.tree.map(jnp.zeros_like, params)
  for impl in ("reference", kimpl):
    f = jax.jit(lambda p, g, m, v, lr, c, impl=impl: vu.velvet_update(
        p, g, m, v, lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-3, count=c,
        skip_zero_grads=False, impl=impl))
    tab.add(f"velvet_update impl={impl}", f, (params, grads, mu, nu, jnp.float32(1e-3),
                                              jnp.int32(3)), bytes_=byt, reps=reps)
  del params, grads, mu, nu

  # ERA fwd+bwd on the FFN gate activation
  x = jax.random.normal(key, (cfg["era_tokens"], cfg["ffn"]), jnp.bfloat16)
  for impl in ("reference", kimpl):
    f = jax.jit(lambda x, impl=impl: jax.vjp(lambda y: era_mod.era(y, impl=impl), x)[1](x))
    tab.add(f"era fwd+bwd bf16 impl={impl}", f, (x,), bytes_=4 * x.nbytes, reps=reps)
  del x

  # linear cross-entropy fwd+bwd
  n, v, d = cfg["ce"]
  k1, k2, k3 = jax.random.split(key, 3)
  h = jax.random.normal(k1, (n, d), jnp.bfloat16)
  w = (0.02 * jax.random.normal(k2, (v, d))).astype(jnp.bfloat16)
  labels = jax.random.randint(k3, (n,), 0, v)
  for impl in ("reference", "chunked", kimpl):
    f = jax.jit(jax.grad(lambda h, w, impl=impl: jnp.mean(ce.linear_cross_entropy(
        h, w, labels, impl=impl)[0]), argnums=(0, 1)))
    tab.add(f"linear_ce fwd+bwd N={n} V={v} D={d} impl={impl}", f, (h, w),
            flops=3 * 2 * n * v * d + (2 * n * v * d if impl != "reference" else 0),
            mem=True, reps=max(1, reps // 2))
  del h, w

  # attention fwd+bwd
  b, s, nh, hd = cfg["attn"]
  q, k_, v_ = (jax.random.normal(kk, (b, s, nh, hd), jnp.bfloat16)
               for kk in jax.random.split(key, 3))
  fl = 4 * b * nh * s * s * hd * 3.5 / 2  # causal: half the square; bwd ~2.5x fwd
  # "tokamax:<kernel>": one of tokamax's own kernels alone, to see which it should try first
  candidates = ["reference", "xla"] + ["cudnn"] * gpu
  if att.tokamax_available():
    candidates += ["tokamax"] + ["tokamax:mosaic", "tokamax:triton"] * gpu
  for name in candidates:
    impl, _, kernel = name.partition(":")
    order = (kernel,) if kernel else att.TOKAMAX_ORDER
    f = jax.jit(jax.grad(lambda q, k, v, impl=impl, order=order: jnp.sum(att.attention(
        q, k, v, True, impl, tokamax_order=order).astype(jnp.float32)), argnums=(0, 1, 2)))
    tab.add(f"attention fwd+bwd S={s} D={hd} impl={name}", f, (q, k_, v_), flops=fl,
            mem=True, reps=reps)

  tab.print()


if __name__ == "__main__":
  main()
