"""Section 1 of the acceptance runs (benchmarks/gpu_acceptance.py, tpu_acceptance.py):
every kernel, compiled (interpreted on CPU), against its pure-JAX reference on fresh
random inputs.

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


def error_text(e, n=400):
  return f"{type(e).__name__}: {str(e)[:n]}"


def rel_err(out, ref):
  """||out - ref|| / ||ref|| in float64; None (never a pass) when anything is non-finite."""
  o, r = (np.asarray(jax.device_get(x)).astype(np.float64) for x in (out, ref))
  if o.shape != r.shape or not (np.isfinite(o).all() and np.isfinite(r).all()):
    return None
  n, d = np.linalg.norm(r), np.linalg.norm(o - r)
  return float(d / n) if n else float(d)


def _accelerator(ctx) -> bool:
  return ctx.gpu or getattr(ctx, "tpu", False)


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
  # blocking: an interpreted Mosaic GPU kernel's host callbacks run JAX ops that would
  # wait behind the reference, dispatched meanwhile (a deadlock on CPU)
  got = jax.block_until_ready(jax.jit(kern)(*jax.device_put(args)))
  up = jax.tree.map(lambda x: np.asarray(x, F32) if x.dtype == BF16 else x, args)
  with jax.default_matmul_precision("highest"):
    return got, jax.jit(ref)(*jax.device_put(up))


def _fwd_bwd(fn, primals, cot):
  out, vjp = jax.vjp(fn, *primals)
  cot = jax.tree.map(lambda c, o: c.astype(o.dtype), cot, out)
  return (*(out if isinstance(out, tuple) else (out,)), *vjp(cot))


def check_velvet(ctx, rng, arg):
  """`arg` is (kernel, skip_zero_grads), kernel "triton" | "mosaic" | "tpu" (impl= of
  velvet_update). On a GPU each entry also holds the kernel's median step time and
  that of XLA's per-leaf update (the reference, jitted): what settles
  platform.CHOICES["velvet_kernel"]."""
  from vesperjax.kernels import _velvet_update as vu
  kernel, skip = arg
  name = f"velvet_update kernel={kernel} skip_zero_grads={skip}"
  if ctx.gpu and not vu.kernel_applies(kernel):
    return [dict(name=name, passed=None, skipped=True,
                 note=f"{kernel} does not run on this GPU (Mosaic GPU needs sm_90)")]
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
  kern = split(lambda *a, **k: vu.velvet_update(*a, **k, impl=kernel,
                                                interpret=ctx.interpret))
  got, want = _run_pair(make, kern, split(vu.velvet_update_reference_jnp), rng)
  timing = {}
  if ctx.gpu:
    args = jax.device_put(make(rng))
    from vesperjax.kernels.bench import median_seconds
    timing = dict(kernel_s=median_seconds(jax.jit(kern), *args),
                  xla_s=median_seconds(jax.jit(split(vu.velvet_update_reference_jnp)),
                                       *args),
                  elements=sum(math.prod(s) for s, _ in shapes.values()))
  return [_entry(f"{name} {k} params", dict(zip(("update", "mu", "nu"), o)), w,
                 [k, "float32", "float32"], dtype=k, kernel=kernel, **timing)
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


def check_ce(ctx, rng, arg):
  """`arg` is a dtype (the Pallas kernel) or (dtype, impl)."""
  from vesperjax.kernels import _cross_entropy as ce
  dt, impl = arg if isinstance(arg, tuple) else (arg, "pallas")
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
          h, w, lab, valid_vocab=v - 10, precision=hi if fp32 else None, impl=impl,
          interpret=ctx.interpret), (h, w), cot),
      lambda h, w, lab, cot: _fwd_bwd(lambda h, w: ce.linear_cross_entropy_reference(
          h, w, lab, valid_vocab=v - 10, precision=hi), (h, w), cot), rng)
  # fp32 with precision=HIGHEST: the Pallas forward's Triton dots are IEEE, not TF32
  kind = "float32" if fp32 else "bfloat16"
  return [_entry(f"linear_ce impl={impl} fwd+bwd+entropy {dt.name} N={n} V={v} D={d}",
                 dict(zip(("loss", "entropy", "dh", "dw"), got)), want, [kind] * 4,
                 dtype=dt.name)]


def check_attention(ctx, rng, impl):
  """`impl` is an attention implementation, or "tokamax:<kernel>" for one of tokamax's
  own (mosaic, triton) on its own, so each kernel that tokamax may pick is checked."""
  from vesperjax.kernels import _attention as att
  shape = (2, 1024, 8, 128) if ctx.big else (1, 128, 2, 32)  # S: one splash block
  name = f"attention impl={impl} bf16 causal fwd+bwd S={shape[1]} D={shape[3]}"
  impl, _, kernel = impl.partition(":")
  if (impl == "cudnn" and not ctx.gpu) or (kernel and not _accelerator(ctx)):
    needs = "a CUDA GPU" if impl == "cudnn" else "a GPU or TPU"
    return [dict(name=name, passed=None, skipped=True, note=f"{kernel or impl} needs {needs}")]
  if impl == "tokamax" and not att.tokamax_available():
    return [dict(name=name, passed=None, skipped=True, note="tokamax is not installed")]
  extra = {"tokamax_order": (kernel,)} if kernel else {}
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


def check_grouped_matmul(ctx, rng, impl):
  """The MoE grouped matmul, fwd+bwd, bf16, uneven groups (one empty) and rows in no
  group: `impl` is a `moe_matmul` choice, or "tokamax:<kernel>" for one of tokamax's
  own (mosaic, triton) on its own. On a GPU each entry also holds its median fwd+bwd
  time: what settles platform.CHOICES["grouped_matmul"] on CUDA."""
  from vesperjax.kernels import _grouped_matmul as gm
  g, d, f, m = (8, 1024, 2816, 16384) if ctx.big else (4, 32, 48, 100)
  name = f"grouped_matmul impl={impl} bf16 fwd+bwd M={m} D={d} F={f} G={g}"
  impl, _, kernel = impl.partition(":")
  if kernel and not _accelerator(ctx):
    return [dict(name=name, passed=None, skipped=True, note=f"{kernel} needs a GPU or TPU")]
  if impl == "tokamax" and not gm._tokamax_installed():  # pylint: disable=protected-access
    return [dict(name=name, passed=None, skipped=True, note="tokamax is not installed")]

  def make(rng):  # x, w, group sizes (group 1 empty, m // 16 rows in none), cotangent
    p = rng.dirichlet(np.ones(g))
    p[1] = 0
    sizes = rng.multinomial(m - m // 16, p / p.sum()).astype(np.int32)
    return (rng.standard_normal((m, d), F32).astype(BF16),
            (rng.standard_normal((g, d, f), F32) / math.sqrt(d)).astype(BF16), sizes,
            rng.standard_normal((m, f), F32))

  def tokamax_kernel(x, w, sizes):  # as GroupLayout runs it: rows in no group zeroed
    grouped = (jnp.arange(m) < sizes.sum())[:, None]
    y = gm.tokamax_ragged_dot(jnp.where(grouped, x, 0), w, sizes, implementation=kernel)
    return jnp.where(grouped, y, 0)

  def loop_over_experts(x, w, sizes):
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(m), side="right")
    return sum(jnp.where((group == e)[:, None], x @ w[e], 0) for e in range(g))

  matmul = tokamax_kernel if kernel else (
      lambda x, w, sizes: gm.grouped_matmul(x, w, sizes, impl=impl))
  def fwd_bwd(fn):
    return lambda x, w, s, c: _fwd_bwd(lambda x, w: fn(x, w, s), (x, w), c)
  kern, ref = fwd_bwd(matmul), fwd_bwd(loop_over_experts)
  got, want = _run_pair(make, kern, ref, rng)
  meta = {"resolves_to": gm.resolve(impl)} if impl == "auto" else {}
  if ctx.gpu:
    from vesperjax.kernels.bench import median_seconds
    meta.update(kernel_s=median_seconds(jax.jit(kern), *jax.device_put(make(rng))),
                flops=3 * 2 * (m - m // 16) * d * f)
  return [_entry(name, dict(zip(("y", "dx", "dw"), got)), want, ["bfloat16"] * 3,
                 dtype="bfloat16", **meta)]


def run_checks(ctx, res, save, checks):
  """Each (check, arg) of `checks` on fresh inputs, recorded in res["checks"] as it ends."""
  seed = int(time.time())  # fresh inputs every run
  res.update(checks=[], interpret=ctx.interpret, thresholds=THRESHOLDS, seed=seed)
  for i, (fn, arg) in enumerate(checks):
    start = time.perf_counter()
    try:
      out = fn(ctx, np.random.default_rng([seed, i]), arg)
    except Exception as e:  # noqa: BLE001  (recorded; the next check still runs)
      out = [dict(name=f"{fn.__name__[6:]} {getattr(arg, 'name', arg)}", passed=False,
                  error=None, exception=error_text(e))]
    for o in out:
      o["seconds"] = round(time.perf_counter() - start, 2)
    res["checks"] += out
    save()


def section_kernels(ctx, res, save):
  """The GPU kernels: Velvet's Triton and Mosaic GPU updates, ERA, the Pallas linear
  cross-entropy, every attention and grouped-matmul candidate."""
  from vesperjax.kernels import _attention as att
  checks = [(check_velvet, (k, s)) for k in ("triton", "mosaic")
            for s in ((False, True) if ctx.big else (True,))]
  checks += [(c, dt) for c in (check_era, check_ce) for dt in (F32, BF16)]
  checks += [(check_attention, i) for i in att.IMPLEMENTATIONS
             if i not in ("reference", "splash")]  # splash: the TPU run's
  checks += [(check_attention, f"tokamax:{k}") for k in ("mosaic", "triton")]
  checks += [(check_grouped_matmul, i) for i in ("auto", "blocked", "ragged_dot", "tokamax",
                                                 "tokamax:mosaic", "tokamax:triton")]
  run_checks(ctx, res, save, checks)
