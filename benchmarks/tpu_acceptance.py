"""One-shot TPU acceptance run on one Cloud TPU VM host: the kernels the `tpu` rows of the
dispatch table pick, compiled by libtpu (no interpret mode), against their pure-JAX
references; bf16 train-step throughput, MFU and memory of small / medium / xlarge with
FSDP over the host's chips, each beside its deviceless plan. Writes
OUT/acceptance.json, .md and .log and prints the markdown table last; docs/tpu.md says
what is measured and the thresholds.

On the TPU VM, from a checkout installed with the `tpu` extra:

  PYTHONUNBUFFERED=1 python3 benchmarks/tpu_acceptance.py --out OUT

CPU smoke run (tiny shapes, the Velvet TPU kernel in Pallas's TPU interpreter; chosen by
itself when no TPU is seen): `python benchmarks/tpu_acceptance.py --reduced --out /tmp/acc`.
The sections and their time boxes work as in benchmarks/gpu_acceptance.py (the shared
runner, acceptance_runner.py).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling *_checks
from acceptance_runner import Acceptance, add_arguments, child_main, run  # noqa: E402
from checkout import mount_kernels  # noqa: E402
from kernel_checks import (BF16, F32, check_attention, check_ce, check_grouped_matmul,  # noqa: E402
                           check_velvet, run_checks)
from throughput_checks import section_throughput  # noqa: E402

JOBS = [("kernels", "", 90), ("throughput", "small", 45), ("throughput", "medium", 60),
        ("throughput", "xlarge", 100)]
REDUCED_JOBS = JOBS[:1] + [("throughput", "small,medium,xlarge", 205)]


def section_kernels(ctx, res, save):
  """What runs on a TPU: Velvet's Mosaic TPU update, the chunked linear cross-entropy,
  the attention (splash among them) and grouped-matmul candidates of the `tpu` rows, and
  tokamax's Mosaic TPU kernels on their own (on a TPU only)."""
  checks = [(check_velvet, ("tpu", s)) for s in ((False, True) if ctx.big else (True,))]
  checks += [(check_ce, (dt, "chunked")) for dt in (F32, BF16)]
  checks += [(check_attention, i) for i in ("auto", "splash", "blocked", "xla", "tokamax",
                                            "tokamax:mosaic")]
  checks += [(check_grouped_matmul, i) for i in ("auto", "blocked", "ragged_dot", "tokamax",
                                                 "tokamax:mosaic")]
  run_checks(ctx, res, save, checks)


def tpu_visible() -> bool:
  """A TPU VM: its chips as accel devices (v4 and later) or vfio devices (v5e, v6e),
  unless JAX_PLATFORMS leaves the TPU out."""
  plats = os.environ.get("JAX_PLATFORMS", "")
  if plats and "tpu" not in plats:
    return False
  return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


SPEC = Acceptance(title="TPU", script=Path(__file__).resolve(), jobs=JOBS,
                  reduced_jobs=REDUCED_JOBS, backend="tpu")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(ap)
  args = ap.parse_args(argv)
  mount_kernels()
  if args.child:
    return child_main(args, "tpu", dict(kernels=section_kernels,
                                        throughput=section_throughput))
  return run(SPEC, args, on_device=tpu_visible())


if __name__ == "__main__":
  sys.exit(main())
