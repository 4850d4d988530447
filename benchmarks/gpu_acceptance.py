"""One-shot GPU acceptance run on one H100/H200: the kernels compiled (no interpret mode)
against their pure-JAX references, the kernel roofline bench, bf16 train-step throughput,
MFU and memory of small / medium / xlarge, and attention / cross-entropy timings for
settling `auto`. Writes OUT/acceptance.json, .md and .log and prints the markdown table
last; docs/gpu-acceptance.md says what is measured and the thresholds.

1. Here, once: fetch what the device lacks (of grain, tensorboardX and ml_collections, the
   import chain of vesperjax.training.train_step / run_config needs only ml_collections, pure
   Python; its absl-py and PyYAML are there; and tokamax with its needs, for the
   tokamax candidates) into a git-ignored folder, check the chain
   against it, and precompute the deviceless memory plans where vesperjax.plan works:

     .venv/bin/python benchmarks/gpu_acceptance.py --prepare build/gpu_acceptance_deps

2. On the device (run tool: carry=["build/gpu_acceptance_deps"], timeout_s=600):

     PYTHONUNBUFFERED=1 python3 benchmarks/gpu_acceptance.py --out $OUT

CPU smoke run (tiny shapes, Pallas interpreted; chosen by itself when no GPU is seen):
`python benchmarks/gpu_acceptance.py --reduced --out /tmp/acc`. Each section runs in its
own process (a clean peak-memory figure per model) under a time box, unused time rolling
over; a failure or timeout is recorded, the rest still run, and the exit status is 1.
"""
from __future__ import annotations

import argparse, contextlib, io, math, os, shutil, subprocess, sys, zipfile  # noqa: E401
from pathlib import Path

import jax  # importing starts no backend: the parent never touches the GPU
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling *_checks
from kernel_checks import (BF16, F32, THRESHOLDS, check_ce, check_era,  # noqa: E402,F401
                           error_text, rel_err, section_kernels)
from checkout import mount_kernels  # noqa: E402
from acceptance_runner import Acceptance, add_arguments, child_main, dump, run  # noqa: E402
from throughput_checks import (MEM_FRACTION, MODELS, VOCAB, model_run,  # noqa: E402,F401
                               plan_figure, section_throughput, throughput_one)
# kernels/bench.py at half its "full" shapes: every operand still >> the 50 MB L2 and each
# call >> launch overhead, without the 1.3B-parameter tree and N=16k CE eating the box.
BENCH_ACCEPTANCE = dict(hidden=1024, layers=12, ffn=4096, vocab=32768, era_tokens=16384,
                        ce=(8192, 32768, 2048), attn=(4, 2048, 16, 128), mm=8192, copy=1 << 28)
JOBS = [("kernels", "", 90), ("bench", "", 100), ("throughput", "small", 45),  # weight: s
        ("throughput", "medium", 60), ("throughput", "xlarge", 100), ("timing", "", 55)]
REDUCED_JOBS = JOBS[:2] + [("throughput", "small,medium,xlarge", 205), JOBS[-1]]


def _use_deps(deps):
  if (Path(deps) / "site").is_dir():
    sys.path.append(str(Path(deps) / "site"))  # after the installed packages: theirs win
  mount_kernels(ROOT)  # from a checkout with nothing installed: kernels/ as vesperjax.kernels


# -------------------------------------------------------------------- 2. roofline bench

def section_bench(ctx, res, save):
  from vesperjax.kernels import bench
  bench.SIZES.setdefault("acceptance", BENCH_ACCEPTANCE)
  size, reps = ("tiny", 1) if ctx.reduced else (ctx.args.bench_size, 10)
  res.update(size=size, shapes=bench.SIZES[size], reps=reps, rows=[])
  keys = ("name", "ms", "gb_s", "tflop_s", "roof_pct", "temp_mb", "note")

  class Recorded(bench.Table):  # bench.main's own table, saved row by row
    def add(self, *a, **k):
      out = super().add(*a, **k)
      res["rows"] = [dict(zip(keys, r)) for r in self.rows]
      save()
      return out
  table, buf, bench.Table = bench.Table, io.StringIO(), Recorded
  try:
    with contextlib.redirect_stdout(buf):
      bench.main(["--size", size, "--reps", str(reps)])
  finally:
    bench.Table, res["stdout"] = table, buf.getvalue()


# ------------------------------------------------------------ 4. implementation timings

def section_timing(ctx, res, save):
  from vesperjax.kernels import _attention as att, _cross_entropy as ce, bench, platform
  b, s, nh, hd = (8, 2048, 16, 128) if ctx.big else (1, 64, 2, 32)  # xlarge's layer
  n, v, d = (b * s, VOCAB, 2048) if ctx.big else (256, 512, 64)  # xlarge's LM head
  rng = np.random.default_rng(1)
  q, k, vv, h, w = jax.device_put([(rng.standard_normal(x, F32) / c).astype(BF16) for x, c in (
      ((b, s, nh, hd), 1),) * 3 + (((n, d), 1), ((v, d), math.sqrt(d)))])
  labels = jax.device_put(rng.integers(0, v, n).astype(np.int32))
  auto = dict(attention=att._choose(q, k, vv, None),  # pylint: disable=protected-access
              cross_entropy=platform.choice("cross_entropy"))
  res.update(attention_shape=[b, s, nh, hd], ce_shape=[n, v, d], rows=[], fastest={},
             auto=auto)
  cases = []  # the slowest to compile last: blocked (8 unrolled blocks), reference
  for impl in ("chunked", "pallas"):
    loss = lambda h, w, impl=impl: jnp.mean(sum(ce.linear_cross_entropy(h, w, labels, impl=impl)))
    cases += [("cross_entropy", f"fwd impl={impl}", jax.jit(loss), (h, w)),
              ("cross_entropy", f"fwd+bwd impl={impl}", jax.jit(jax.grad(loss, (0, 1))), (h, w))]
  cases += [("attention", f"fwd+bwd impl={i}", jax.jit(jax.grad(
      lambda q, k, v, i=i: jnp.sum(att.attention(q, k, v, True, i).astype(jnp.float32)),
      argnums=(0, 1, 2))), (q, k, vv)) for i in att.IMPLEMENTATIONS
            if i not in ("auto", "splash") and (i != "cudnn" or ctx.gpu)]
  for group, name, fn, args in cases:
    try:
      row = dict(group=group, name=name, ms=1e3 * bench.median_seconds(
          fn, *args, reps=10 if ctx.big else 2))
    except Exception as e:  # noqa: BLE001
      row = dict(group=group, name=name, ms=None, error=error_text(e, 300))
    res["rows"].append(row)
    save()
  for group in ("attention", "cross_entropy"):
    ok = [r for r in res["rows"] if r["group"] == group and r["ms"] and "bwd" in r["name"]]
    if ok:
      res["fastest"][group] = min(ok, key=lambda r: r["ms"])["name"].split("impl=")[1]


# ----------------------------------------------------------------------- the parent

def gpu_visible():
  plats, smi = os.environ.get("JAX_PLATFORMS", ""), shutil.which("nvidia-smi")
  if (plats and "cuda" not in plats and "gpu" not in plats) or not smi:
    return False
  with contextlib.suppress(OSError, subprocess.SubprocessError):
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and "GPU" in out.stdout
  return False


# GPU-only packages of the acceptance run, missing from the device's image
DEVICE_EXTRAS = ("tokamax", "qwix", "typeguard", "immutabledict", "einshape", "pydantic",
                 "pydantic-core", "annotated-types", "typing-inspection")


def prepare(dest):
  """Unpacked wheels of what the device lacks in DEST/site; plans in DEST/plans.json."""
  import importlib.metadata
  dest = Path(dest).resolve()
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary"
                  "=:all:", "-d", str(dest / "wheels"),
                  f"ml_collections=={importlib.metadata.version('ml_collections')}"], check=True)
  # tokamax (the attention and ragged_dot candidates) and what it needs that the device's
  # image lacks, at this host's versions; pydantic-core is compiled: the device's Python
  # and platform (device/README.md: CPython 3.12, manylinux x86_64)
  platform_flags = ["--python-version", "3.12", "--implementation", "cp"] + [
      a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
      for a in ("--platform", tag)]
  subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary"
                  "=:all:", *platform_flags, "-d", str(dest / "wheels")]
                 + [f"{n}=={importlib.metadata.version(n)}" for n in DEVICE_EXTRAS], check=True)
  for whl in (dest / "wheels").glob("*.whl"):
    zipfile.ZipFile(whl).extractall(dest / "site")
  probe = ("import sys, importlib.abc as a, importlib.machinery as m\nsite = sys.argv[1]\n"
           "sys.path.insert(0, 'benchmarks')\nfrom checkout import mount_kernels\n"
           "class Device(a.MetaPathFinder):\n def find_spec(self, n, p=None, t=None):\n"
           "  if n.split('.')[0] in ('grain', 'tensorboardX'): raise ImportError(n)\n"
           "  if n == 'ml_collections': return m.PathFinder.find_spec(n, [site]) or 1 / 0\n"
           "sys.meta_path.insert(0, Device())\n"
           "mount_kernels()\n"
           "import vesperjax.training.train_step, vesperjax.run_config, ml_collections\n"
           "print('import chain ok without grain / tensorboardX; ml_collections from', "
           "ml_collections.__file__)")
  subprocess.run([sys.executable, "-c", probe, str(dest / "site")], check=True, cwd=ROOT,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  plans = {}
  try:
    from vesperjax.planning.program import plan_step  # pylint: disable=g-import-not-at-top
    for preset in MODELS:
      run, batch, seq = model_run(preset, False)
      for target in ("h100-80gb", "h200"):
        got = plan_step(run, target=target, devices=1, mem_fraction=MEM_FRACTION)
        total = got["per_device_bytes"]["total"]
        plans[f"{preset}:b{batch}:s{seq}:bfloat16:{target}"] = dict(
            total=total, fits=got.get("fits"), jax=jax.__version__)
        print(f"plan {preset} B={batch} {target}: {total / 2**30:.2f} GiB", flush=True)
  except Exception as e:  # noqa: BLE001  (absent, or no CUDA plugin here)
    plans["note"] = error_text(e, 300)
    print(f"deviceless plans skipped: {plans['note']}")
  dump(plans, dest / "plans.json")
  print(f"prepared {dest}: carry it with the run (carry=[{os.path.relpath(dest, ROOT)!r}])")


SPEC = Acceptance(
    title="GPU", script=Path(__file__).resolve(), jobs=JOBS, reduced_jobs=REDUCED_JOBS,
    backend="gpu",
    child_flags=lambda args: ["--deps", str(args.deps), "--bench-size", args.bench_size],
    child_env=lambda args: {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get(
        "XLA_PYTHON_CLIENT_MEM_FRACTION", str(MEM_FRACTION))})


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(ap)
  ap.add_argument("--prepare", metavar="DIR", help="fetch what the device lacks into DIR")
  ap.add_argument("--deps", default=str(ROOT / "build" / "gpu_acceptance_deps"),
                  help="the --prepare folder (default %(default)s)")
  ap.add_argument("--bench-size", default="acceptance", choices=("acceptance", "full"))
  args = ap.parse_args(argv)
  _use_deps(args.deps)
  if args.child:
    return child_main(args, "gpu", {name[8:]: fn for name, fn in globals().items()
                                    if name.startswith("section_")})
  if args.prepare:
    return prepare(args.prepare)
  return run(SPEC, args, on_device=gpu_visible())


if __name__ == "__main__":
  sys.exit(main())
