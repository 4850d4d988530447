"""The model's size from its config alone (no arrays built): what plans and logs quote."""
from vesperjax.config import ModelConfig
from vesperjax.model.meta_head import meta_head_params


def num_params(config: ModelConfig) -> int:
  """Trainable parameters of `VesperLM(config)`, counted from the shapes alone.

  The frozen FlyLoRA projections A and their routing biases are not parameters. With
  `freeze_base` only the FlyLoRA up-projections B train.
  """
  d, f, r, h = config.hidden_size, config.ffn_size, config.lora_rank, config.num_heads
  lora_b = 2 * r * f  # gate and up each carry a [r, f] B
  meta = 0
  if config.meta_head:
    meta = meta_head_params(d)
  if config.freeze_base:
    return config.num_layers * lora_b * max(config.num_experts, 1) + meta
  ffn = 2 * (d * f + f) + lora_b + (f * d + d)  # gate, up (+ B), down
  if config.is_moe:
    ffn = d * config.num_experts + config.num_experts * ffn  # router + experts
  head_dim = d // h
  attention = d * 3 * h * head_dim + 3 * h * head_dim + h * head_dim * d + d
  block = 2 * d + attention + 2 * d + ffn  # two LayerNorms (scale + bias)
  return config.vocab_size * d + config.num_layers * block + 2 * d + meta
