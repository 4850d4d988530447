"""`python -m vesperjax.export --workdir RUN [--step N | --best] [--dtype fp32|bf16]
[--quantize int8|int4] [--format vesperjax|hf] --out DIR`.

Writes a run's model as safetensors beside its config.json and tokenizer.json (the
layout and names: `vesperjax.inference.pretrained`, docs/export.md), for `vesperjax.load_pretrained`,
`python -m vesperjax.generate --model DIR` and other tools. Past `--max-shard-size` the
tensors are split over `model-0000i-of-0000N.safetensors` files with a
`model.safetensors.index.json`, as Hugging Face does. `--format hf` adds what Hugging
Face Transformers needs to load the folder (`vesperjax.inference.hf`: the PyTorch model's
source, Transformers keys in config.json, the tokenizer's configuration).

The checkpoint is restored sharded over every device (FSDP), and each tensor (one layer of
a stacked variable) is gathered on its own and written straight to its file: no host
holds more than one tensor beyond its share of the model. With several processes all of
them gather; process 0 writes. With --quantize, each weight that `vesperjax.inference.quantize`
quantizes is quantized one layer at a time by the qwix call `quantize_for_inference`
makes and stored as its codes and scales. Everything is written into a temporary folder
beside --out and renamed into place at the end, so a failure never leaves half an export.
Bad input ends with one `error:` line on stderr and exit status 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
from typing import Callable

from absl import flags

from vesperjax.inference import pretrained as fmt
from vesperjax.cli import one_line, run_cli, user_errors

DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's save_pretrained default
FORMATS = ("vesperjax", "hf")
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "I8", "uint8": "U8"}

FLAGS = flags.FlagValues()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by vesperjax.train.",
                               flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).",
                             flag_values=FLAGS)
_BEST = flags.DEFINE_bool("best", False, "Export the checkpoint with the lowest eval loss.",
                          flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "fp32", sorted(fmt.WEIGHTS_DTYPES),
                           "Dtype of the stored parameters (FlyLoRA's frozen projections "
                           "and routing biases stay fp32).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Folder to write (must not exist or be empty, "
                           "unless --overwrite).", flag_values=FLAGS)
_QUANTIZE = flags.DEFINE_enum(
    "quantize", None, list(fmt.QUANTIZATION_MODES), "Store the attention and FFN weights "
    "quantized (weight-only, per output channel, qwix; the same weights and scales as "
    "generate --quantize; needs 'vesperjax[quantize]').", flag_values=FLAGS)
_MAX_SHARD_SIZE = flags.DEFINE_string(
    "max-shard-size", DEFAULT_MAX_SHARD_SIZE, "Largest safetensors file before splitting "
    "into shards: bytes, or a number with KB/MB/GB (powers of 1000) or KiB/MiB/GiB.",
    flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum(
    "format", "vesperjax", list(FORMATS), "vesperjax: safetensors, config.json and "
    "tokenizer.json; hf: also the files Hugging Face Transformers loads with "
    "trust_remote_code (the PyTorch model's source, the tokenizer's configuration).",
    flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.",
                               flag_values=FLAGS)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
  """Bytes of "5GB", "500MB", "64KiB" or "4096"."""
  found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
  unit = found and found.group(2).upper()
  if not found or unit not in _UNITS or float(found.group(1)) * _UNITS[unit] < 1:
    raise ValueError(f"--max-shard-size {text!r}: expected a positive size such as 5GB, "
                     "500MB, 64KiB or 4096")
  return int(float(found.group(1)) * _UNITS[unit])


def _nbytes(entry: fmt.Entry, weights_dtype: str) -> int:
  n = entry.dtype(weights_dtype).itemsize
  for d in entry.shape:
    n *= d
  return n


def plan_shards(entries: list[fmt.Entry], weights_dtype: str,
                limit: int) -> list[list[fmt.Entry]]:
  """Consecutive groups of entries of at most `limit` bytes (a larger tensor alone)."""
  shards, current, size = [], [], 0
  for e in entries:
    n = _nbytes(e, weights_dtype)
    if current and size + n > limit:
      shards.append(current)
      current, size = [], 0
    current.append(e)
    size += n
  return shards + [current] if current else shards


def shard_file_names(count: int) -> list[str]:
  if count == 1:
    return [fmt.WEIGHTS_NAME]
  return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: list[fmt.Entry], weights_dtype: str,
                       framework: str = "flax") -> bytes:
  """The file's 8-byte little-endian header length and JSON header (the safetensors
  format), padded with spaces so the tensor data starts 8-byte aligned. `framework`:
  the metadata's "format" ("pt" for `--format hf`, whose tensors are the PyTorch
  model's as they are: Transformers 4 reads "flax" as a Flax checkpoint to convert)."""
  header = {"__metadata__": {"format": framework, "vesperjax_format": fmt.FORMAT,
                             "vesperjax_format_version": str(fmt.FORMAT_VERSION)}}
  offset = 0
  for e in entries:
    n = _nbytes(e, weights_dtype)
    header[e.name] = {"dtype": _SAFETENSORS_DTYPES[e.dtype(weights_dtype).name],
                      "shape": list(e.shape), "data_offsets": [offset, offset + n]}
    offset += n
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return struct.pack("<Q", len(text)) + text


def restore_variables(workdir: str, config, step: int | None, best: bool, mesh,
                      log: Callable[[str], None] = lambda line: None) -> tuple[int, dict]:
  """(step read, {variable path: jax.Array}) of the model at `step` (None: the newest,
  or the best; the then-newest when a running trainer rotates it out while it is read,
  said through `log`), sharded on `mesh` by the logical rules (`loading.load_model`'s
  restore, onto every device instead of one)."""
  from flax import nnx

  from vesperjax.inference.loading import restore_model_variables
  from vesperjax.checkpoint import CheckpointError

  try:
    step, _, params, rest = restore_model_variables(workdir, config, mesh, step=step,
                                                    best=best, log=log)
  except user_errors():
    raise
  except Exception as e:  # noqa: BLE001  (orbax/tensorstore on a damaged checkpoint)
    which = "best" if best else "newest" if step is None else step
    raise CheckpointError(f"cannot read checkpoint {which} of {workdir}: {one_line(e)}") \
        from None
  flat = {}
  for part in (params, rest):
    for path, var in nnx.to_flat_state(part):
      flat[tuple(str(p) for p in path)] = var[...]
  return step, flat


def _host_value(x):
  """The whole of a (possibly sharded, multi-process) array as numpy, on every host."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class _Tensors:
  """The host value of each stored tensor, gathered one at a time. A quantized weight's
  layer is quantized once for its codes and scales (adjacent entries) and then dropped."""

  def __init__(self, values: dict, weights_dtype: str, config, quantization: str | None):
    from vesperjax.inference.quantize import quantized_tensors
    self.values, self.weights_dtype, self.quantization = values, weights_dtype, quantization
    self.contracted = {t.module + (t.name,): t.contracted for t in quantized_tensors(config)}
    self.last = None  # ((path, layer), QArray) of the latest quantized layer

  def __call__(self, e: fmt.Entry):
    x = self.values[e.path]
    x = x if e.layer is None else x[e.layer]
    if e.part is None:
      return _host_value(x.astype(e.dtype(self.weights_dtype)))
    import jax.numpy as jnp

    from vesperjax.inference.quantize import quantize_array
    if self.last is None or self.last[0] != (e.path, e.layer):
      self.last = None  # drop the previous layer's before quantizing this one
      self.last = ((e.path, e.layer), quantize_array(x, self.quantization,
                                                     self.contracted[e.path]))
    qarray = self.last[1]
    if e.part == "scale":
      return _host_value(qarray.scale)
    codes = _host_value(qarray.qvalue.astype(jnp.int8))
    return fmt.pack_int4(codes) if self.quantization == "int4" else codes


def _write_shard(path: str | None, entries: list[fmt.Entry], tensors: _Tensors,
                 weights_dtype: str, framework: str) -> None:
  """One safetensors file, tensor by tensor (path None: gather only, another process
  writes)."""
  import numpy as np
  f = open(path, "wb") if path else None
  try:
    if f:
      f.write(safetensors_header(entries, weights_dtype, framework))
    for e in entries:
      host = tensors(e)
      assert host.shape == e.shape and host.dtype == e.dtype(weights_dtype), e.name
      if f:
        f.write(np.ascontiguousarray(host).tobytes())  # jax hosts are little-endian
      del host
  finally:
    if f:
      f.close()


def _check_out(out: str, workdir: str, overwrite: bool) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out}: exists and is not a folder")
  real_out, real_run = os.path.realpath(out), os.path.realpath(workdir)
  if real_run == real_out or real_run.startswith(real_out + os.sep) \
      or real_out.startswith(real_run + os.sep):
    raise ValueError(f"--out {out}: must be outside the run directory {workdir} (and not "
                     "contain it)")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ValueError(f"--out {out}: not empty; pass --overwrite to replace it")


def export(workdir: str, out: str, *, step: int | None = None, best: bool = False,
           dtype: str = "fp32", quantize: str | None = None,
           max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
           format: str = "vesperjax", mesh=None, log: Callable[[str], None] = lambda line: None,
           note: Callable[[str], None] = lambda line: None) -> dict:
  """Export a run's checkpoint (latest, `step`, or `best`) to the folder `out`.

  `dtype`: "fp32" or "bf16" for the parameters. `quantize`: None, or "int8" / "int4" to
  store the weights `vesperjax.inference.quantize.quantized_tensors` names as the codes and fp32
  scales that `quantize_for_inference` gives them (quantized from the checkpoint's fp32
  values, whatever `dtype`). `format`: "vesperjax", or "hf" to add the files Hugging
  Face Transformers loads (`vesperjax.inference.hf`). `mesh`: where the checkpoint is restored
  (default: FSDP over every device). `log`: a line per file written; `note`: a line
  when a running trainer rotated the checkpoint out while it was read (the then-newest
  is exported instead). Returns config.json's content plus "files" (the safetensors
  files written) and "total_size" (their tensor bytes); "source" names the step read.
  """
  import jax

  from vesperjax import sharding
  from vesperjax.checkpoint import read_json
  from vesperjax.config import ModelConfig

  if dtype not in fmt.WEIGHTS_DTYPES:
    raise ValueError(f"--dtype {dtype}: choose from {', '.join(sorted(fmt.WEIGHTS_DTYPES))}")
  weights_dtype = fmt.WEIGHTS_DTYPES[dtype]
  if quantize is not None:
    if quantize not in fmt.QUANTIZATION_MODES:
      raise ValueError(f"--quantize {quantize}: choose from "
                       f"{', '.join(fmt.QUANTIZATION_MODES)}")
    from vesperjax.inference.quantize import require_qwix
    require_qwix()  # before the checkpoint is read: one error line, at once
  if format not in FORMATS:
    raise ValueError(f"--format {format}: choose from {', '.join(FORMATS)}")
  limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
  if not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir}: no such directory")
  if step is not None and best:
    raise ValueError("give --step N or --best, not both")
  _check_out(out, workdir, overwrite)
  config = ModelConfig.from_dict(read_json(os.path.join(workdir, "model_config.json")))
  tok_src = os.path.join(workdir, fmt.TOKENIZER_NAME)
  read_json(tok_src)  # present and JSON: a run directory
  tokenizer = None
  if format == "hf":  # its special tokens go into the Transformers files
    from vesperjax.data import Tokenizer
    tokenizer = Tokenizer.from_file(tok_src)
  kind = "best" if best else "latest" if step is None else "step"
  mesh = mesh or sharding.make_mesh(fsdp=-1)
  step, values = restore_variables(workdir, config, step, best, mesh, log=note)

  entries = fmt.layout(config, quantize)
  tensors = _Tensors(values, weights_dtype, config, quantize)
  shards = plan_shards(entries, weights_dtype, limit)
  names = shard_file_names(len(shards))
  saved = {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION,
           "model": config.to_dict(), "weights_dtype": weights_dtype,
           "source": {"step": step, "checkpoint": kind}, "quantization": quantize}
  if format == "hf":
    from vesperjax.inference import hf
    saved.update(hf.config_fields(config, tokenizer, weights_dtype))
  main = jax.process_index() == 0
  out = os.path.abspath(out)
  tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.export-tmp-{os.getpid()}")
  if main:
    os.makedirs(tmp)
  try:
    for name, group in zip(names, shards):
      log(f"writing {name} ({len(group)} tensors)")
      _write_shard(os.path.join(tmp, name) if main else None, group, tensors, weights_dtype,
                   "pt" if format == "hf" else "flax")
    total = sum(_nbytes(e, weights_dtype) for e in entries)
    if main:
      if len(names) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e.name: n for n, g in zip(names, shards) for e in g}}
        _write_json(os.path.join(tmp, fmt.INDEX_NAME), index)
      _write_json(os.path.join(tmp, fmt.CONFIG_NAME), saved)
      shutil.copyfile(tok_src, os.path.join(tmp, fmt.TOKENIZER_NAME))
      if format == "hf":
        hf.write_files(tmp, config, tokenizer)
      _move_into_place(tmp, out)
  except BaseException:
    if main:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("vesperjax: export written")
  return dict(saved, files=names, total_size=total)


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def _move_into_place(tmp: str, out: str) -> None:
  """Rename the finished `tmp` to `out`; an old `out` is set aside first and removed only
  once the new one is in place."""
  old = None
  if os.path.isdir(out):
    old = f"{tmp}-old"
    os.rename(out, old)
  try:
    os.rename(tmp, out)
  except OSError:
    if old:
      os.rename(old, out)
    raise
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _on_process_0(line: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def run() -> int:
  import jax
  if not _WORKDIR.value:
    raise ValueError("--workdir RUN is required (a directory written by vesperjax.train)")
  if not _OUT.value:
    raise ValueError("--out DIR is required (the folder to write)")
  if _STEP.value is not None and _STEP.value < 0:
    raise ValueError(f"--step {_STEP.value}: must be >= 0")
  limit = parse_size(_MAX_SHARD_SIZE.value)
  from vesperjax.distributed import maybe_initialize_distributed
  maybe_initialize_distributed()
  result = export(_WORKDIR.value, _OUT.value, step=_STEP.value, best=_BEST.value,
                  dtype=_DTYPE.value, quantize=_QUANTIZE.value, max_shard_size=limit,
                  overwrite=_OVERWRITE.value, format=_FORMAT.value, note=_on_process_0)
  if jax.process_index() == 0:
    print(f"exported step {result['source']['step']} of {_WORKDIR.value} to {_OUT.value}: "
          f"{len(result['files'])} safetensors file(s), {result['total_size'] / 1e6:.1f} MB "
          f"of tensors ({result['weights_dtype']} parameters"
          f"{', ' + result['quantization'] + ' weights' if result['quantization'] else ''})",
          file=sys.stderr)
  return 0


def main(argv=None) -> int:
  return run_cli(sys.argv if argv is None else argv, run, flag_values=FLAGS)


if __name__ == "__main__":
  sys.exit(main())
