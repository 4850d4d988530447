"""`python -m vesperjax.eval --model DIR --tasks T1,T2 [--include-path PATH]
[--batch-size N] [--limit N] [--num-fewshot N] [--device cpu] [--output FILE
[--log-samples]]`.

Evaluates an export written by `python -m vesperjax.export --format hf` on
lm-evaluation-harness tasks through lm-eval's Python API (`lm_eval.simple_evaluate` with
its Hugging Face model): what `lm_eval --model hf --model_args
pretrained=DIR,trust_remote_code=True` runs, with the export's stored dtype and
max_seq_len filled in. Prints one line per task (each metric with its standard error);
--output writes lm-eval's results as JSON. Tasks are lm-eval's own names (their data
are downloaded by the `datasets` library on first use) or YAML tasks in --include-path.
Needs 'vesperjax[eval]' (lm-eval, torch, transformers). Bad input (no such folder, not
a --format hf export, an unknown task) ends with one `error:` line on stderr and exit
status 2.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys

from absl import flags

from vesperjax.cli import run_cli

FLAGS = flags.FlagValues()
_MODEL = flags.DEFINE_string("model", None, "Folder written by `python -m vesperjax.export "
                             "--format hf`.", flag_values=FLAGS)
_TASKS = flags.DEFINE_list("tasks", [], "lm-eval task, group or tag names, comma-separated "
                           "(`lm-eval ls tasks` lists them; glob patterns allowed).",
                           flag_values=FLAGS)
_INCLUDE_PATH = flags.DEFINE_string("include-path", None, "Folder of further lm-eval YAML "
                                    "tasks (tests/lm_eval_tasks holds an example).",
                                    flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_string(
    "batch-size", "8", "Sequences per forward pass: a number, or auto (lm-eval tries "
    "sizes until one fits: for a GPU).", flag_values=FLAGS)
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N documents of "
                              "each task (for trying things out: the metrics are not "
                              "comparable).", flag_values=FLAGS)
_DEVICE = flags.DEFINE_string("device", None, "torch device, e.g. cpu, cuda or cuda:1 "
                              "(default: cuda if torch sees one, else cpu).",
                              flag_values=FLAGS)
_NUM_FEWSHOT = flags.DEFINE_integer("num-fewshot", None, "Examples in each prompt "
                                    "(default: each task's own).", flag_values=FLAGS)
_OUTPUT = flags.DEFINE_string("output", None, "Write lm-eval's results (metrics, task "
                              "configurations, versions) to this JSON file.",
                              flag_values=FLAGS)
_LOG_SAMPLES = flags.DEFINE_bool("log-samples", False, "Include each document's requests "
                                 "and responses (log-likelihoods) in --output.",
                                 flag_values=FLAGS)

EXTRA = "pip install 'vesperjax[eval]'"
NEEDED = {"lm_eval": "lm-eval", "accelerate": "accelerate", "torch": "torch",
          "transformers": "transformers"}  # module: distribution (lm-eval[hf] needs all)


def missing_packages() -> list[str]:
  """The distributions of NEEDED that cannot be imported."""
  return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def export_settings(directory: str) -> dict:
  """lm-eval's model_args for an hf export: its dtype and context length beside the
  defaults that load it (ValueError when the folder is not a --format hf export)."""
  from vesperjax.inference.hf import AUTO_MAP, TEMPLATES
  from vesperjax.inference.pretrained import read_config
  saved = read_config(directory)
  missing = [n for n in TEMPLATES if not os.path.isfile(os.path.join(directory, n))]
  if saved.get("auto_map") != AUTO_MAP or missing:
    raise ValueError(f"--model {directory}: an export without the Transformers files "
                     "(config.json's auto_map, modeling_vesperlm.py); export it with "
                     "--format hf")
  return {"pretrained": os.path.abspath(directory), "trust_remote_code": True,
          "dtype": saved.get("dtype") or saved["weights_dtype"],
          "max_length": saved["max_position_embeddings"]}  # the model's max_seq_len


def batch_size(text: str) -> int | str:
  if re.fullmatch(r"auto(:\d+)?", text):
    return text
  if text.isdigit() and int(text) > 0:
    return int(text)
  raise ValueError(f"--batch-size {text}: expected a positive number, auto or auto:N")


def drop_checkout_root() -> None:
  """Take a source checkout's root off sys.path: its top-level `kernels/` folder would
  shadow the PyPI package `kernels` that Transformers 5 imports (`python -m` from the
  root puts the root first; PYTHONPATH may too). Done in this process rather than by a
  `python -I` subprocess, which would also drop PYTHONPATH and the user site-packages
  where lm-eval may be installed; vesperjax's modules, already imported as a package,
  keep loading through the package's own path. An installed wheel has no such folder."""
  import vesperjax
  root = os.path.realpath(os.path.dirname(os.path.dirname(vesperjax.__file__)))
  if os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]


def metric_cells(row: dict) -> list[str]:
  """`acc 0.3000 ± 0.1051` for each metric of one task's results ("name,filter" keys;
  a filter other than lm-eval's "none" is shown in parentheses)."""
  cells = []
  for key, value in row.items():
    name, _, filt = key.partition(",")
    if not filt or "_stderr" in name or not isinstance(value, (int, float)):
      continue
    label = name if filt == "none" else f"{name}({filt})"
    err = row.get(f"{name}_stderr,{filt}")
    spread = f" ± {err:.4f}" if isinstance(err, (int, float)) and math.isfinite(err) else ""
    cells.append(f"{label} {value:.4f}{spread}")
  return cells


def table(results: dict) -> list[str]:
  """One line per task and group: name, documents evaluated, shots, metrics."""
  rows = {**results.get("results", {}), **results.get("groups", {})}
  width = max(map(len, rows), default=0)
  lines = []
  for task, row in rows.items():
    n = results.get("n-samples", {}).get(task, {}).get("effective")
    shots = results.get("n-shot", {}).get(task)
    head = f"{task:<{width}}  " + (f"{n} docs" if n is not None else "group")
    head += f", {shots}-shot" if isinstance(shots, int) else ""
    lines.append("  ".join([head, *metric_cells(row)]))
  return lines


def run() -> int:
  if not _MODEL.value:
    raise ValueError("--model DIR is required (a folder written by python -m "
                     "vesperjax.export --format hf)")
  model_args = export_settings(_MODEL.value)
  if not _TASKS.value:
    raise ValueError("--tasks is required, e.g. --tasks hellaswag,arc_easy")
  include = _INCLUDE_PATH.value
  if include is not None and not os.path.isdir(include):
    raise ValueError(f"--include-path {include}: no such directory")
  if _LIMIT.value is not None and _LIMIT.value < 1:
    raise ValueError(f"--limit {_LIMIT.value}: must be >= 1")
  if _NUM_FEWSHOT.value is not None and _NUM_FEWSHOT.value < 0:
    raise ValueError(f"--num-fewshot {_NUM_FEWSHOT.value}: must be >= 0")
  size = batch_size(_BATCH_SIZE.value)
  output = _OUTPUT.value
  if output is not None and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise ValueError(f"--output {output}: its folder does not exist")  # before the work
  if _LOG_SAMPLES.value and output is None:
    raise ValueError("--log-samples writes into --output FILE: give one")
  missing = missing_packages()
  if missing:
    raise ValueError(f"python -m vesperjax.eval needs {', '.join(missing)} (lm-eval "
                     f"with its hf extra): {EXTRA}")
  drop_checkout_root()
  import lm_eval
  from lm_eval.tasks import TaskManager

  tasks = TaskManager(include_path=include)
  unknown = [t for t in _TASKS.value if not (tasks.match_tasks([t]) or os.path.isfile(t))]
  if unknown:
    where = f" or in {include}" if include else ""
    raise ValueError(f"unknown task {', '.join(unknown)}: not one of lm-eval's{where} "
                     "(`lm-eval ls tasks` lists them)")
  results = lm_eval.simple_evaluate(
      model="hf", model_args=model_args, tasks=list(_TASKS.value), batch_size=size,
      device=_DEVICE.value, limit=_LIMIT.value, num_fewshot=_NUM_FEWSHOT.value,
      log_samples=_LOG_SAMPLES.value, task_manager=tasks)
  if results is None:  # another process of a multi-process run: rank 0 reports
    return 0
  print("\n".join(table(results)), flush=True)
  if output is not None:
    with open(output, "w") as f:  # default=str: task configs hold functions
      json.dump(dict(results), f, indent=2, default=str)
      f.write("\n")
  return 0


def main(argv=None) -> int:
  return run_cli(sys.argv if argv is None else argv, run, flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
