"""Section 1 of the GPU acceptance run (benchmarks/gpu_acceptance.py): every kernel,
compiled (interpreted on CPU), against its pure-JAX reference on fresh random inputs.

A check passes when each output's relative error ``||out - ref|| / ||ref||`` (float64)
is finite and under its dtype's threshold; references run in fp32 on upcast inputs with
full-precision matmuls.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

BF16, F32 = np.dtype(jnp.bfloat16), np.dtype(np.float32)
THRESHOLDS = {"float32": 1e-4, "bfloat16": 1e-2}  # ||out-ref|| / ||ref||


def _err(e, n=400):
  return f"{type(e).__name__}: {str(e)[:n]}"


def rel_err(out, ref):
  """||out - ref|| / ||ref|| in float64; None (never a pass) when anything is non-finite."""
  o, r = (np.asarray(jax.device_get(x)).astype(np.float64) for x in (out, ref))
  if o.shape != r.shape or not (np.isfinite(o).all() and np.isfinite(r).all()):
    return None
  n, d = np.linalg.norm(r), np.linalg.norm(o - r)
  return float(d / n) if n else float(d)


def _entry(name, outs, refs, kinds, **meta):
  """One check: each output's error against the threshold of its kind."""
  errors = {}
  for (k, o), r, kind in zip(outs.items(), refs, kinds):
    e, t = rel_err(o, r), THRESHOLDS[kind]
    errors[k] = dict(error=e, threshold=t, kind=kind, passed=e is not None and e <= t)
  worst = max(errors.values(), key=lambda x: math.inf if x["error"] is None
              else x["error"] / x["threshold"])
  return dict(name=name, passed=all(x["passed"] for x in errors.values()), errors=errors,
              error=worst["error"], threshold=worst["threshold"], **meta)


def _run_pair(make, kern, ref, rng):
  """Fresh random inputs (numpy: no compiles), the kernel on them, and the reference in
  fp32 on their upcasts with fp32 matmuls at full precision (the truth)."""
  args = make(rng)
  got = jax.jit(kern)(*jax.device_put(args))
  up = jax.tree.map(lambda x: np.asarray(x, F32) if x.dtype == BF16 else x, args)
  with jax.default_matmul_precision("highest"):
    return got, jax.jit(ref)(*jax.device_put(up))


def _fwd_bwd(fn, primals, cot):
  out, vjp = jax.vjp(fn, *primals)
  cot = jax.tree.map(lambda c, o: c.astype(o.dtype), cot, out)
  return (*(out if isinstance(out, tuple) else (out,)), *vjp(cot))


def check_velvet(ctx, rng, skip):
  from vesperjax.kernels import _velvet_update as vu
  d, f, v = (1024, 2752, 8000) if ctx.big else (32, 48, 100)
  shapes = {"embed": ((v, d), F32), "w_in": ((d, f), BF16), "bias": ((f,), F32),
            "odd": ((37, 129), BF16), "ln": ((d,), BF16), "w_out": ((f, d), F32)}

  def make(rng):  # (params, grads, mu, nu, lr, count); mixed dtypes, some exact-zero grads
    t = {n: (rng.standard_normal(s, F32).astype(dt), (1e-2 * rng.standard_normal(s, F32) * (
        rng.random(s) > 0.1 if skip else 1)).astype(dt), 1e-3 * rng.standard_normal(s, F32),
                 1e-5 * rng.uniform(0.1, 1, s).astype(F32)) for n, (s, dt) in shapes.items()}
    return (*({n: x[i] for n, x in t.items()} for i in range(4)),
            np.float32(1e-3 * rng.random()), np.int32(rng.integers(1, 1000)))

  def split(fn):  # per param dtype: update, mu, nu concatenated over its leaves
    def run(p, g, m, nu, lr, count):
      out = fn(p, g, m, nu, lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
               count=count, skip_zero_grads=skip)
      return [[jnp.concatenate([o[n].astype(F32).ravel() for n, (_, t) in shapes.items()
                                if t == dt]) for o in out] for dt in (F32, BF16)]
    return run
  got, want = _run_pair(make, split(lambda *a, **k: vu.velvet_update(
      *a, **k, impl="pallas", interpret=ctx.interpret)),
                        split(vu.velvet_update_reference_jnp), rng)
  return [_entry(f"velvet_update {k} params skip_zero_grads={skip}",
                 dict(zip(("update", "mu", "nu"), o)), w, [k, "float32", "float32"], dtype=k)
          for k, o, w in zip(("float32", "bfloat16"), got, want)]


def check_era(ctx, rng, dt):
  from vesperjax.kernels import _era as era_mod
  shape = (4096, 2755) if ctx.big else (48, 67)  # not a multiple of the block
  make = lambda rng: ((2 * rng.standard_normal(shape, F32)).astype(dt),  # noqa: E731
                      np.float32(0.05 + 0.1 * rng.random()),  # gamma, traced: gets a grad
                      rng.standard_normal(shape, F32).astype(dt))
  got, want = _run_pair(
      make, lambda x, g, dy: _fwd_bwd(lambda x, g: era_mod.era(
          x, g, impl="pallas", interpret=ctx.interpret), (x, g), dy),
      lambda x, g, dy: _fwd_bwd(lambda x, g: era_mod.era_reference(x, g), (x, g), dy), rng)
  return [_entry(f"era fwd+bwd {dt.name}", dict(zip(("y", "dx", "dgamma"), got)), want,
                 [dt.name] * 3, dtype=dt.name)]


def check_ce(ctx, rng, dt):
  from vesperjax.kernels import _cross_entropy as ce
  fp32, hi = dt == F32, jax.lax.Precision.HIGHEST
  n, v, d = {(True, True): (1000, 4000, 256), (True, False): (2048, 8192, 512),
             (False, True): (100, 300, 32), (False, False): (128, 256, 32)}[(ctx.big, fp32)]

  def make(rng):  # h, w, labels (-1: ignored; the last 10 ids: vocab padding), cotangents
    labels = rng.integers(0, v - 10, n).astype(np.int32)
    return (rng.standard_normal((n, d), F32).astype(dt),
            (rng.standard_normal((v, d), F32) / math.sqrt(d)).astype(dt),
            np.where(rng.random(n) < 0.05, -1, labels),
            (rng.standard_normal(n, F32), rng.standard_normal(n, F32)))
  got, want = _run_pair(
      make, lambda h, w, lab, cot: _fwd_bwd(lambda h, w: ce.linear_cross_entropy(
          h, w, lab, valid_vocab=v - 10, precision=hi if fp32 else None, impl="pallas",
          interpret=ctx.interpret), (h, w), cot),
      lambda h, w, lab, cot: _fwd_bwd(lambda h, w: ce.linear_cross_entropy_reference(
          h, w, lab, valid_vocab=v - 10, precision=hi), (h, w), cot), rng)
  # fp32 with precision=HIGHEST: the Pallas forward's Triton dots are IEEE, not TF32
  kind = "float32" if fp32 else "bfloat16"
  return [_entry(f"linear_ce fwd+bwd+entropy {dt.name} N={n} V={v} D={d}",
                 dict(zip(("loss", "entropy", "dh", "dw"), got)), want, [kind] * 4,
                 dtype=dt.name)]


def check_attention(ctx, rng, impl):
  from vesperjax.kernels import _attention as att
  shape = (2, 1024, 8, 128) if ctx.big else (1, 64, 2, 32)
  name = f"attention impl={impl} bf16 causal fwd+bwd S={shape[1]} D={shape[3]}"
  if impl == "cudnn" and not ctx.gpu:
    return [dict(name=name, passed=None, skipped=True, note="cuDNN needs a CUDA GPU")]
  extra = {"interpret": ctx.interpret} if impl == "pallas" else {}
  got, want = _run_pair(
      lambda rng: tuple(rng.standard_normal(shape, F32).astype(BF16) for _ in range(4)),
      lambda q, k, v, c: _fwd_bwd(lambda *a: att.attention(*a, True, impl, **extra),
                                  (q, k, v), c),
      lambda q, k, v, c: _fwd_bwd(lambda *a: att.attention_reference(*a, True), (q, k, v), c),
      rng)
  q = jnp.zeros(shape, jnp.bfloat16)
  meta = {"resolves_to": att._choose(q, q, q, None)} if impl == "auto" else {}  # pylint: disable=protected-access
  return [_entry(name, dict(zip(("out", "dq", "dk", "dv"), got)), want, ["bfloat16"] * 4,
                 dtype="bfloat16", **meta)]


def section_kernels(ctx, res, save):
  from vesperjax.kernels import _attention as att
  checks = [(check_velvet, s) for s in ((False, True) if ctx.big else (True,))]
  checks += [(c, dt) for c in (check_era, check_ce) for dt in (F32, BF16)]
  checks += [(check_attention, i) for i in att.IMPLEMENTATIONS if i != "reference"]
  seed = int(time.time())  # fresh inputs every run
  res.update(checks=[], interpret=ctx.interpret, thresholds=THRESHOLDS, seed=seed)
  for i, (fn, arg) in enumerate(checks):
    start = time.perf_counter()
    try:
      out = fn(ctx, np.random.default_rng([seed, i]), arg)
    except Exception as e:  # noqa: BLE001  (recorded; the next check still runs)
      out = [dict(name=f"{fn.__name__[6:]} {getattr(arg, 'name', arg)}", passed=False,
                  error=None, exception=_err(e))]
    for o in out:
      o["seconds"] = round(time.perf_counter() - start, 2)
    res["checks"] += out
    save()
