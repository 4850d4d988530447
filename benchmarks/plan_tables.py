"""What the plan tables share (benchmarks/gpu_plan_table.py for docs/gpu.md,
benchmarks/tpu_plan_table.py for docs/tpu.md): the run every cell plans, the resumable
JSON report, progress lines on stderr, and the report's header.

Every cell: `default_run_config(preset)` at vocab 32768, Velvet, grad_accum 1, auto
dtype (bf16 on an accelerator), scanned layers, the given seq_len and remat policy, and
FSDP over the devices when there are several. Budget: 75% of a device's memory.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling vs_original

VOCAB = 32768
MEM_FRACTION = 0.75
GiB = 2**30


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_config(preset: str, seq: int, remat: str = "none", *, fsdp: int = 1):
  """The RunConfig of one cell: default_run_config(preset) with the tables' settings,
  FSDP over `fsdp` devices when it is more than one."""
  from vesperjax.run_config import RunConfig, default_run_config
  run = default_run_config(preset)
  run.model.vocab_size = VOCAB
  run.optim.name = "velvet"
  run.data.seq_len = seq
  run.train.grad_accum = 1
  run.model.remat = remat
  run.model.dtype = "auto"
  if fsdp > 1:
    run.mesh.data, run.mesh.fsdp = 1, fsdp
  return RunConfig.from_config_dict(run)


def load(path: str) -> dict:
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return {}


def save(path: str, data: dict) -> None:
  """Write `data` whole, atomically: a run stopped mid-write leaves the last report."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def header(command: str, **versions) -> dict:
  """command, commit (git describe), date, machine, jax version (+ `versions`)."""
  import jax

  from vesperjax.bench.optimizers import source_commit
  from vs_original import machine_info
  return dict(command=command, commit=source_commit(),
              date=datetime.datetime.now(datetime.timezone.utc).strftime(
                  "%Y-%m-%d %H:%M UTC"),
              machine=dict(machine_info(), nice=os.nice(0)), jax=jax.__version__,
              **versions)


def write_markdown(report_path: str, text: str) -> None:
  """Print a table's markdown and write it beside its report (REPORT.md)."""
  print(text)
  with open(os.path.splitext(report_path)[0] + ".md", "w", encoding="utf-8") as f:
    f.write(text + "\n")
