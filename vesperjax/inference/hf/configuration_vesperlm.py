"""Hugging Face Transformers configuration of a VesperLM exported by vesperjax.

This file is copied into an export written by `python -m vesperjax.export --format hf`
and loaded by `AutoConfig.from_pretrained(DIR, trust_remote_code=True)`. It needs only
`transformers` (never vesperjax or JAX). The export's config.json holds the vesperjax
`ModelConfig` under "model" (one source of truth); the usual Transformers names
(`hidden_size`, `num_hidden_layers`, ...) are derived from it here so that generic tools
(`generate`, lm-evaluation-harness) find them.
"""
from transformers import PretrainedConfig

# vesperjax's ModelConfig defaults for the fields the PyTorch model reads (a config.json
# written by the exporter always holds every field; these serve a config built by hand)
MODEL_DEFAULTS = {
    "vocab_size": 32768, "hidden_size": 256, "num_layers": 6, "num_heads": 4,
    "ffn_size": 1024, "max_seq_len": 2048, "rope_theta": 10000.0, "norm_eps": 1e-6,
    "init_std": 0.02, "era_gamma": 0.1, "lora_rank": 16, "lora_alpha": 32.0,
    "lora_topk": 4, "lora_density": 0.25, "num_experts": 0, "top_k": 2,
    "meta_head": False,
}


class VesperLMConfig(PretrainedConfig):
  """`model`: the vesperjax ModelConfig as a dict; `quantization`: None, "int8" or
  "int4" (the export's weight storage, read by the model when it is built)."""
  model_type = "vesperlm"

  def __init__(self, model=None, quantization=None, **kwargs):
    self.model = {**MODEL_DEFAULTS, **(model or {})}
    self.quantization = quantization
    m = self.model
    self.vocab_size = m["vocab_size"]
    self.hidden_size = m["hidden_size"]
    self.num_hidden_layers = m["num_layers"]
    self.num_attention_heads = m["num_heads"]
    self.num_key_value_heads = m["num_heads"]
    self.head_dim = m["hidden_size"] // m["num_heads"]
    self.intermediate_size = m["ffn_size"]
    self.max_position_embeddings = m["max_seq_len"]
    self.rope_theta = m["rope_theta"]
    self.initializer_range = m["init_std"]
    # the derived names above are recomputed from `model`; stale copies in kwargs (a
    # config saved by `save_pretrained`) must not override them
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size",
                 "max_position_embeddings", "rope_theta", "initializer_range"):
      kwargs.pop(name, None)
    # the LM head is the embedding matrix itself (one parameter), nothing to tie
    kwargs["tie_word_embeddings"] = False
    super().__init__(**kwargs)
