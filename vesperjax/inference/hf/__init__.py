"""The Hugging Face Transformers side of an export (`python -m vesperjax.export --format
hf`): what the folder holds beyond vesperjax's own files, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` load it, offline.

  configuration_vesperlm.py   copies of this package's two template modules: the
  modeling_vesperlm.py        PyTorch VesperLM (torch + transformers only)
  config.json                 vesperjax's keys plus model_type, architectures, auto_map,
                              dtype and the special token ids
  tokenizer_config.json       PreTrainedTokenizerFast over tokenizer.json, the
                              end-of-document token as eos / bos / pad
  special_tokens_map.json     the same tokens (older Transformers read it)
  generation_config.json      eos / bos / pad ids for `generate`

Nothing here imports torch or transformers: the files are plain JSON and copies, so an
export needs neither installed.
"""
from __future__ import annotations

import json
import os
import shutil
from importlib import resources

MODEL_TYPE = "vesperlm"
ARCHITECTURE = "VesperLMForCausalLM"
TEMPLATES = ("configuration_vesperlm.py", "modeling_vesperlm.py")
AUTO_MAP = {"AutoConfig": "configuration_vesperlm.VesperLMConfig",
            "AutoModelForCausalLM": "modeling_vesperlm.VesperLMForCausalLM"}
TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}  # weights_dtype -> torch


def config_fields(config, tokenizer, weights_dtype: str) -> dict:
  """The keys config.json gains for Transformers (merged with vesperjax's own, which the
  template config reads: "model" is the ModelConfig, "quantization" the weights' form).
  `tokenizer`: the run's `vesperjax.data.Tokenizer`."""
  eod = tokenizer.eod_id
  return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "auto_map": AUTO_MAP,
          # older Transformers read torch_dtype, newer dtype
          "dtype": TORCH_DTYPES[weights_dtype], "torch_dtype": TORCH_DTYPES[weights_dtype],
          "bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod,
          "max_position_embeddings": config.max_seq_len, "use_cache": True}


def tokenizer_files(config, tokenizer) -> dict[str, dict]:
  """{file name: JSON content} of the tokenizer's Transformers configuration. The
  end-of-document token (written after every document in training) is eos, bos (what
  precedes a document) and pad; nothing is added to encoded text, as in vesperjax."""
  eod = tokenizer.eod_token
  special = {"bos_token": eod, "eos_token": eod, "pad_token": eod, "unk_token": eod}
  return {
      "tokenizer_config.json": {
          "tokenizer_class": "PreTrainedTokenizerFast", **special,
          "add_bos_token": False, "add_eos_token": False,
          "clean_up_tokenization_spaces": False, "model_max_length": config.max_seq_len},
      "special_tokens_map.json": special,
      "generation_config.json": {"bos_token_id": tokenizer.eod_id,
                                 "eos_token_id": tokenizer.eod_id,
                                 "pad_token_id": tokenizer.eod_id},
  }


def write_files(directory: str, config, tokenizer) -> None:
  """The template modules and the tokenizer / generation JSON files, into `directory`
  (config.json and the weights are the exporter's)."""
  package = resources.files(__name__)
  for name in TEMPLATES:
    with resources.as_file(package / name) as src:
      shutil.copyfile(src, os.path.join(directory, name))
  for name, content in tokenizer_files(config, tokenizer).items():
    with open(os.path.join(directory, name), "w") as f:
      json.dump(content, f, indent=2, sort_keys=True)
      f.write("\n")
