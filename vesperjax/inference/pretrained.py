"""An exported model folder (`python -m vesperjax.export`): its layout, and loading it.

DIR/
  config.json                      {"format": "vesperjax-safetensors", "format_version",
                                    "model": the ModelConfig, "weights_dtype", "source",
                                    "quantization": null | "int8" | "int4"}
  model.safetensors                the tensors, or past the shard size limit:
  model-00001-of-0000N.safetensors   shards, with
  model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {name: file}}
  tokenizer.json                   the run's tokenizer (HF `tokenizers`)
(`--format hf` adds Transformers' files and config.json keys: `vesperjax.inference.hf`)

Tensor names are the model's variable paths, dotted, with the scanned layer stack split
per layer: `blocks.attn.qkv_kernel` [L, ...] is stored as `layers.{i}.attn.qkv_kernel`
(docs/export.md lists every name). Parameters are stored in `weights_dtype`; FlyLoRA's
frozen down-projections (`lora_a`) and routing biases stay float32: they decide which
ranks each token uses, and a rounded value could flip that discrete choice.

A quantized export (`--quantize int8|int4`) stores each weight that
`vesperjax.inference.quantize.quantized_tensors` names as its qwix codes and scales instead:
`layers.{i}.<name>.qvalue` (int8: I8 codes of the weight's shape; int4: `pack_int4`'s
U8 bytes) and `layers.{i}.<name>.scale` (F32, the weight's shape with 1 on the
contracted axes). `load_pretrained` rebuilds the `QuantizedWeight`s that
`quantize_for_inference` makes, bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, NamedTuple

import numpy as np

FORMAT = "vesperjax-safetensors"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
WEIGHTS_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # flag value -> numpy name
QUANTIZATION_MODES = ("int8", "int4")
_QVALUE_DTYPES = {"int8": "int8", "int4": "uint8"}  # stored dtype of the codes
STACKED_PREFIX, LAYER_PREFIX = "blocks", "layers"


class ExportFormatError(ValueError):
  """A folder that is not a readable vesperjax export (one-line message)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One stored tensor: its name, the model variable it comes from (`path`, and the
  layer index into the stacked variable or None), its stored shape, and whether it is a
  trainable-kind Param (stored in `weights_dtype`) or other state (always float32)."""
  name: str
  path: tuple
  layer: int | None
  shape: tuple[int, ...]
  is_param: bool
  part: str | None = None  # "qvalue" or "scale" of a quantized weight
  stored: str | None = None  # the fixed stored dtype of a quantized weight's part

  def dtype(self, weights_dtype: str) -> np.dtype:
    import ml_dtypes
    if self.stored:
      return np.dtype(self.stored)
    name = weights_dtype if self.is_param else "float32"
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def abstract_model(config, quantization: str | None = None):
  """The VesperLM of `config` as shapes only (nothing allocated), quantized as
  `quantize_for_inference(model, quantization)` quantizes it. Built outside any ambient
  mesh (a run's `jax.set_mesh`, under which the layer stack's sharding would be
  resolved against a mesh without its `layers` axis); placement is the caller's."""
  import jax
  from flax import nnx

  from vesperjax import model as vmodel

  def create():
    from vesperjax.inference.quantize import quantize_for_inference
    return quantize_for_inference(vmodel.VesperLM(config, rngs=nnx.Rngs(0)), quantization)
  with jax.set_mesh(None):
    if quantization is None:
      return vmodel.abstract_model(config)
    return nnx.eval_shape(create)


def pack_int4(codes: np.ndarray) -> np.ndarray:
  """int4 codes (integers in [-8, 7], any integer dtype) as uint8, two per byte along the
  last axis: byte j holds code 2j in its low nibble and code 2j+1 in its high nibble,
  each as 4-bit two's complement; an odd last axis is padded with a zero code."""
  codes = np.asarray(codes).astype(np.int16)
  if codes.shape[-1] % 2:
    codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.int16)], -1)
  nibbles = (codes & 0xF).astype(np.uint8)
  return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray, size: int) -> np.ndarray:
  """The int8 codes that `pack_int4` stored in `packed`, `size` of them on the last
  axis."""
  packed = np.asarray(packed, np.uint8)
  nibbles = np.stack([packed & 0xF, packed >> 4], -1).reshape(packed.shape[:-1] + (-1,))
  codes = nibbles[..., :size].astype(np.int8)
  return np.where(codes > 7, codes - 16, codes).astype(np.int8)


def _packed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  return shape[:-1] + ((shape[-1] + 1) // 2,)


def _quantized_entries(name: str, path: tuple, layer: int | None, qarray,
                       quantization: str) -> list[Entry]:
  strip = slice(0 if layer is None else 1, None)
  qshape = tuple(qarray.qvalue.shape)[strip]
  if quantization == "int4":
    qshape = _packed_shape(qshape)
  return [Entry(f"{name}.qvalue", path, layer, qshape, False, "qvalue",
                _QVALUE_DTYPES[quantization]),
          Entry(f"{name}.scale", path, layer, tuple(qarray.scale.shape)[strip], False,
                "scale", "float32")]


def layout(config, quantization: str | None = None) -> list[Entry]:
  """Every stored tensor of a model of `config` (quantized to `quantization`, or not),
  in file order (sorted by name within the unstacked variables, then layer by layer)."""
  from flax import nnx

  from vesperjax.inference.quantize import QuantizedWeight
  entries = []
  for path, var in nnx.to_flat_state(nnx.state(abstract_model(config, quantization))):
    path = tuple(str(p) for p in path)
    if isinstance(var, QuantizedWeight):
      stacked = path[0] == STACKED_PREFIX
      for i in range(var.get_raw_value().shape[0]) if stacked else [None]:
        name = ".".join(((LAYER_PREFIX, str(i)) + path[1:]) if stacked else path)
        entries += _quantized_entries(name, path, i, var.get_raw_value(), quantization)
      continue
    is_param = isinstance(var, nnx.Param)
    shape = tuple(var.shape)
    if path[0] == STACKED_PREFIX:
      for i in range(shape[0]):
        entries.append(Entry(".".join((LAYER_PREFIX, str(i)) + path[1:]), path, i,
                             shape[1:], is_param))
    else:
      entries.append(Entry(".".join(path), path, None, shape, is_param))
  return sorted(entries, key=lambda e: (e.layer is not None, e.layer or 0, e.name))


# ModelConfig fields besides EXECUTION_FIELDS in which a run may differ from the export
# it starts from (`train.init_from`): how it trains, not what the weights compute
TRAINING_FIELDS = ("freeze_base", "lora_bias_rate", "moe_aux_weight", "moe_capacity_factor",
                   "meta_weight", "meta_trunk_grad", "init_std", "max_seq_len")


def load_for_init(directory: str, config, tokenizer, mesh):
  """The model of the export in `directory`, fp32 and placed on `mesh`, for a run of
  `config` with `tokenizer` that starts from it (`train.init_from`). One-line
  ExportFormatError when it is quantized (rounded codes do not train), when its model
  differs from `config` outside EXECUTION_FIELDS and TRAINING_FIELDS, or its tokenizer
  from `tokenizer`
  (another vocabulary would give the embedding rows other meanings)."""
  from vesperjax.config import EXECUTION_FIELDS
  from vesperjax.data import Tokenizer
  key = f"train.init_from={directory}"
  try:
    saved = read_config(directory)
    exported = model_config(saved, os.path.join(directory, CONFIG_NAME))
  except ExportFormatError as e:
    raise ExportFormatError(f"{key}: {e}") from None
  if saved.get("quantization"):
    raise ExportFormatError(f"{key}: the export is quantized ({saved['quantization']}), "
                            "rounded weights that cannot train; export without --quantize")
  for name, value in exported.to_dict().items():
    free = name in EXECUTION_FIELDS or name in TRAINING_FIELDS
    if not free and getattr(config, name) != value:
      raise ExportFormatError(f"{key}: this run's model.{name} is {getattr(config, name)!r},"
                              f" the export's {value!r}; set model.{name}={value}")
  tok_path = os.path.join(directory, TOKENIZER_NAME)
  if os.path.isfile(tok_path) and \
      Tokenizer.from_file(tok_path).content_hash != tokenizer.content_hash:
    raise ExportFormatError(f"{key}: this run's tokenizer differs from the export's "
                            f"(another vocabulary or merges); set data.tokenizer={tok_path}")
  try:
    return load_pretrained(directory, dtype="float32", mesh=mesh).model
  except ExportFormatError as e:
    raise ExportFormatError(f"{key}: {e}") from None


class Pretrained(NamedTuple):
  """What `load_pretrained` returns: `model, tokenizer = load_pretrained(DIR)`."""
  model: Any  # VesperLM in eval mode
  tokenizer: Any  # vesperjax.data.Tokenizer


def read_config(directory: str) -> dict:
  """config.json of an export, checked to be one (ExportFormatError otherwise)."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isdir(directory):
    raise ExportFormatError(f"{directory}: no such directory")
  if not os.path.isfile(path):
    raise ExportFormatError(f"{directory} is not a vesperjax export: no {CONFIG_NAME}")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ExportFormatError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(saved, dict) or saved.get("format") != FORMAT:
    raise ExportFormatError(f"{directory} is not a vesperjax export ({CONFIG_NAME} has no "
                            f'"format": "{FORMAT}")')
  version = saved.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportFormatError(f"{path}: format_version {version!r} is not supported (this "
                            f"vesperjax reads version {FORMAT_VERSION})")
  if saved.get("weights_dtype") not in WEIGHTS_DTYPES.values():
    raise ExportFormatError(f"{path}: weights_dtype {saved.get('weights_dtype')!r} is "
                            f"not one of {sorted(WEIGHTS_DTYPES.values())}")
  if saved.get("quantization") not in (None,) + QUANTIZATION_MODES:
    raise ExportFormatError(f"{path}: quantization {saved.get('quantization')!r} is not "
                            f"one of null, {', '.join(QUANTIZATION_MODES)}")
  return saved


def model_config(saved: dict, path: str):
  from vesperjax.config import ModelConfig
  try:
    return ModelConfig.from_dict(saved["model"])
  except (KeyError, TypeError, ValueError) as e:
    raise ExportFormatError(f"{path}: bad \"model\" entry ({e})") from None


def weight_files(directory: str) -> dict[str, str]:
  """{tensor name: file name} from the index, or every tensor of model.safetensors.
  A missing or unreadable file is an ExportFormatError naming it."""
  from safetensors import safe_open
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      assert isinstance(weight_map, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
      raise ExportFormatError(f"{index}: not a safetensors index (no weight_map)") from None
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(directory, WEIGHTS_NAME)):
    weight_map, files = None, [WEIGHTS_NAME]
  else:
    raise ExportFormatError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")
  found = {}
  for name in files:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      raise ExportFormatError(f"{directory}: shard {name} is missing (listed in "
                              f"{INDEX_NAME})")
    try:
      with safe_open(path, framework="numpy") as f:
        keys = list(f.keys())
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
      raise ExportFormatError(f"{path}: not a readable safetensors file "
                              f"({' '.join(str(e).split())})") from None
    found.update((k, name) for k in keys)
  if weight_map is not None:
    absent = sorted(k for k, v in weight_map.items() if found.get(k) != v)
    if absent:
      raise ExportFormatError(f"{directory}: tensor {absent[0]} is listed in {INDEX_NAME} "
                              f"but not in {weight_map[absent[0]]}")
  return found


def load_pretrained(directory: str, *, dtype=None, mesh=None) -> Pretrained:
  """(model, tokenizer) of an export written by `python -m vesperjax.export`.

  Every tensor is checked against the shapes and dtypes that config.json implies before
  it is placed (ExportFormatError names the first that differs). `dtype`: None keeps the
  stored parameter dtype; "float32"/"bfloat16" (or a numpy/jax dtype) casts the
  parameters (FlyLoRA's frozen projections and routing biases stay float32). `mesh`:
  None places the model on one device (the first); a mesh
  (`vesperjax.sharding.make_mesh`) shards it by the logical axis rules. The files are
  memory-mapped and read one variable (all its layers) at a time. The model is in eval
  mode. A quantized export (config.json "quantization") loads as the model
  `vesperjax.inference.quantize.quantize_for_inference` makes, bit for bit; it needs qwix, and
  `dtype` casts only the unquantized parameters.
  """
  import jax
  from flax import nnx
  from safetensors import safe_open

  from vesperjax import sharding
  from vesperjax.data import Tokenizer

  saved = read_config(directory)
  config = model_config(saved, os.path.join(directory, CONFIG_NAME))
  tok_path = os.path.join(directory, TOKENIZER_NAME)
  if not os.path.isfile(tok_path):
    raise ExportFormatError(f"{directory}: no {TOKENIZER_NAME}")
  try:
    tokenizer = Tokenizer.from_file(tok_path)
  except Exception as e:  # noqa: BLE001  (tokenizers raises its own Exception)
    raise ExportFormatError(f"{tok_path}: not a tokenizer ({' '.join(str(e).split())})") \
        from None
  quantization = saved.get("quantization")
  if quantization:
    from vesperjax.inference.quantize import require_qwix
    require_qwix()
  files = weight_files(directory)
  entries = layout(config, quantization)
  expected = {e.name for e in entries}
  unexpected = sorted(set(files) - expected)
  if unexpected:
    raise ExportFormatError(f"{directory}: tensor {unexpected[0]} is not part of the model "
                            f"that config.json describes")
  cast = None if dtype is None else _float_dtype(dtype)

  mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
  graphdef, state = nnx.split(abstract_model(config, quantization))
  shardings = dict(nnx.to_flat_state(  # a quantized weight's codes: as the weight's
      sharding.state_shardings(nnx.state(abstract_model(config)), mesh)))
  by_path: dict[tuple, list[Entry]] = {}
  for e in entries:
    by_path.setdefault(e.path, []).append(e)
  handles = {}
  try:
    for name in sorted(set(files.values())):
      handles[name] = safe_open(os.path.join(directory, name), framework="numpy")
    flat = []
    for path, var in nnx.to_flat_state(state):
      key = tuple(str(p) for p in path)
      read = lambda part: _read_variable(  # noqa: E731
          handles, files, [e for e in by_path[key] if e.part == part],
          saved["weights_dtype"], directory)
      target = shardings[path].get_value()
      if by_path[key][0].part:
        value = _quantized_weight(var.get_raw_value(), read("qvalue"), read("scale"),
                                  target)
      else:
        host = read(None)
        if cast is not None and isinstance(var, nnx.Param):
          host = host.astype(cast)
        value = _place(host, target)
        del host
      flat.append((path, var.replace(value)))
  finally:
    handles.clear()  # safe_open handles close when released
  model = nnx.merge(graphdef, nnx.from_flat_state(flat))
  model.eval()
  return Pretrained(model, tokenizer)


def _place(host: np.ndarray, target):
  import jax
  return jax.make_array_from_callback(host.shape, target, lambda idx: host[idx])


def _read_variable(handles, files, entries: list[Entry], weights_dtype: str,
                   directory: str) -> np.ndarray:
  """One variable's stored tensors (every layer of a stacked one, stacked), checked."""
  parts = [_read(handles, files, e, weights_dtype, directory) for e in entries]
  return parts[0] if entries[0].layer is None else np.stack(parts)


def _quantized_weight(abstract, qvalue: np.ndarray, scale: np.ndarray, target):
  """The qwix QArray of one quantized weight, shaped like `abstract` (its
  `abstract_model` value), codes placed as the weight is, scales replicated along their
  size-1 axes."""
  import qwix
  from jax.sharding import NamedSharding, PartitionSpec
  spec = tuple(target.spec) + (None,) * (scale.ndim - len(target.spec))
  scale_target = NamedSharding(target.mesh, PartitionSpec(
      *(None if n == 1 else s for n, s in zip(scale.shape, spec))))
  if qvalue.dtype == np.uint8:  # int4, packed
    qvalue = unpack_int4(qvalue, abstract.qvalue.shape[-1])
  codes = _place(qvalue.astype(np.int8), target).astype(abstract.qvalue.dtype)
  return qwix.QArray(qvalue=codes, scale=_place(scale, scale_target), zero_point=None,
                     qtype=abstract.qtype)


def _float_dtype(dtype) -> np.dtype:
  import jax.numpy as jnp
  try:
    dt = jnp.dtype(WEIGHTS_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"load_pretrained: dtype {dtype!r} is not a floating-point dtype "
                     "(float32, bfloat16, ...)")
  return dt


def _read(handles, files, entry: Entry, weights_dtype: str, directory: str) -> np.ndarray:
  if entry.name not in files:
    raise ExportFormatError(f"{directory}: tensor {entry.name} is missing")
  tensor = handles[files[entry.name]].get_tensor(entry.name)
  want = entry.dtype(weights_dtype)
  if tuple(tensor.shape) != entry.shape or tensor.dtype != want:
    raise ExportFormatError(
        f"{directory}: tensor {entry.name} is {tensor.dtype.name} {list(tensor.shape)}, but "
        f"config.json implies {want.name} {list(entry.shape)}")
  return tensor
