"""VesperLM model configuration: one frozen dataclass, the named presets, and validation.

Every field is a plain Python value so a config round-trips through JSON (it is saved
with each run and read back by `generate`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# vesperjax.kernels.attention implementations (tests/test_config.py: the same list)
ATTENTION_IMPLS = (None, "auto", "cudnn", "tokamax", "splash", "xla", "blocked", "reference")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# vesperjax.kernels.grouped_matmul implementations (the MoE expert matmuls)
MOE_MATMULS = ("auto", "blocked", "ragged_dot", "tokamax")
# How the model runs, not what it is: a run may resume with other values of these.
EXECUTION_FIELDS = ("dtype", "remat", "attention_impl", "scan_layers", "moe_matmul")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and behaviour of a VesperLM.

  FlyLoRA (arXiv 2510.08396) sits in the gate/up projections of every FFN: a frozen sparse
  random A (lora_rank x hidden, `lora_density` of each row non-zero), rank-wise top-k
  routing that keeps `lora_topk` of the `lora_rank` ranks per token, and a trainable
  zero-initialised B scaled by lora_alpha / lora_rank. `lora_rank=0` disables it.
  """
  vocab_size: int = 32768
  hidden_size: int = 256
  num_layers: int = 6
  num_heads: int = 4
  ffn_size: int = 1024
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  era_gamma: float = 0.1
  # FlyLoRA
  lora_rank: int = 16
  lora_alpha: float = 32.0
  lora_topk: int = 4  # the original's "sparsity 0.25" read as k / r
  lora_density: float = 0.25  # non-zero fraction of each row of the frozen A
  lora_bias_rate: float = 1e-3  # step of the gradient-free rank load-balancing bias
  freeze_base: bool = False  # adapter-only training: only FlyLoRA B matrices train
  # Mixture of Experts (num_experts == 0: dense FFN)
  num_experts: int = 0
  top_k: int = 2
  moe_aux_weight: float = 0.01
  # Per-expert capacity = ceil(factor * tokens * top_k / num_experts) over the tokens of
  # one device (of the whole batch without a mesh); assignments beyond it are dropped
  # (counted in aux "dropped_tokens"). None = dropless.
  moe_capacity_factor: float | None = None
  # The experts' grouped matmuls, one of MOE_MATMULS: "auto" (the target platform's
  # choice, vesperjax.kernels.platform), "blocked" (padded row blocks, the CPU path),
  # "ragged_dot" (jax.lax.ragged_dot) or "tokamax" (tokamax.ragged_dot, `gpu` extra)
  moe_matmul: str = "auto"
  # Metacognition head (vesperjax/model/meta_head.py, docs/metacognition.md): per
  # position, P(the model's top-1 next-token guess is right) and P(the document ends
  # next), trained by a binary cross-entropy added to the loss with weight meta_weight.
  # meta_trunk_grad: let that loss train the trunk too (off: the head reads the hidden
  # states through a stop_gradient, so the trunk's gradient is the language model's).
  meta_head: bool = False
  meta_weight: float = 0.1
  meta_trunk_grad: bool = False
  # Numerics and memory
  dtype: str = "auto"  # compute dtype; "auto" = bfloat16 on GPU/TPU, float32 on CPU
  # (the target platform, vesperjax.kernels.platform)
  remat: str = "none"  # per-layer rematerialisation policy, one of REMAT_POLICIES
  # True: the layers run as one `lax.scan` (compile time flat in depth). False: a Python
  # loop over the same stacked parameters; each layer's residuals then stay separate
  # buffers instead of being stacked into [layers, ...] ones, which XLA:CPU runs faster
  # for shallow models (docs/benchmarks.md, "The measurement behind each CPU choice").
  # Checkpoints are the same either way; decoding with a KV cache always scans.
  scan_layers: bool = True
  # vesperjax.kernels.attention: None/"auto" (choice per backend), "cudnn", "tokamax"
  # (the gpu extra), "xla" (jax.nn.dot_product_attention), "blocked" or "reference"
  attention_impl: str | None = None

  def __post_init__(self):
    _validate(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  @property
  def lora_nonzeros_per_row(self) -> int:
    """Non-zeros in each row of A, as the paper's reference code counts them."""
    return max(1, int(self.hidden_size * self.lora_density))

  def compute_dtype(self) -> jnp.dtype:
    """`dtype`; "auto" is bfloat16 when the target platform is an accelerator."""
    if self.dtype == "auto":
      from vesperjax.kernels import platform  # pylint: disable=g-import-not-at-top
      return getattr(jnp, platform.choice("compute_dtype"))  # float32 on CPU
    return jnp.dtype(self.dtype)

  def replace(self, **overrides: Any) -> "ModelConfig":
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"ModelConfig: unknown field(s) {sorted(unknown)}")
    if d.get("attention_impl") == "pallas":  # saved before that path was removed
      d = {**d, "attention_impl": None}  # an execution choice: the platform's default
    return cls(**d)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _validate(c: ModelConfig) -> None:
  def need(ok: bool, field: str, why: str):
    if not ok:
      raise ValueError(f"ModelConfig.{field}={getattr(c, field)!r}: {why}")

  for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
               "max_seq_len"):
    value = getattr(c, name)
    need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
         "must be a positive integer")
  need(c.hidden_size % c.num_heads == 0, "hidden_size",
       f"must be divisible by num_heads={c.num_heads}")
  need(c.head_dim % 2 == 0, "num_heads",
       f"head_dim={c.head_dim} must be even for split-half RoPE")
  need(c.rope_theta > 0, "rope_theta", "must be positive")
  need(c.norm_eps > 0, "norm_eps", "must be positive")
  need(c.init_std > 0, "init_std", "must be positive")
  need(isinstance(c.lora_rank, int) and c.lora_rank >= 0, "lora_rank",
       "must be an integer >= 0 (0 disables FlyLoRA)")
  if c.lora_rank:
    need(isinstance(c.lora_topk, int) and 1 <= c.lora_topk <= c.lora_rank, "lora_topk",
         f"must be in [1, lora_rank={c.lora_rank}]")
    need(0.0 < c.lora_density <= 1.0, "lora_density", "must be in (0, 1]")
    need(c.lora_bias_rate >= 0, "lora_bias_rate", "must be >= 0")
  need(c.lora_rank > 0 or not c.freeze_base, "freeze_base",
       "needs FlyLoRA adapters (lora_rank > 0) to have anything to train")
  need(isinstance(c.num_experts, int) and c.num_experts >= 0, "num_experts",
       "must be an integer >= 0 (0 = dense FFN)")
  if c.num_experts:
    need(isinstance(c.top_k, int) and 1 <= c.top_k <= c.num_experts, "top_k",
         f"must be in [1, num_experts={c.num_experts}]")
    need(c.moe_aux_weight >= 0, "moe_aux_weight", "must be >= 0")
    need(c.moe_capacity_factor is None or (
        isinstance(c.moe_capacity_factor, (int, float))
        and not isinstance(c.moe_capacity_factor, bool) and c.moe_capacity_factor > 0),
         "moe_capacity_factor", "must be None (dropless) or a positive number")
  need(isinstance(c.meta_head, bool), "meta_head", "must be True or False")
  need(isinstance(c.meta_trunk_grad, bool), "meta_trunk_grad", "must be True or False")
  need(isinstance(c.meta_weight, (int, float)) and not isinstance(c.meta_weight, bool)
       and c.meta_weight >= 0 and c.meta_weight < float("inf"), "meta_weight",
       "must be a finite number >= 0")
  need(c.meta_head or not c.meta_trunk_grad, "meta_trunk_grad",
       "needs the head (meta_head=True)")
  need(c.dtype in DTYPES, "dtype", f"must be one of {DTYPES}")
  need(c.remat in REMAT_POLICIES, "remat", f"must be one of {REMAT_POLICIES}")
  need(c.attention_impl in ATTENTION_IMPLS, "attention_impl",
       f"must be one of {ATTENTION_IMPLS}")
  need(isinstance(c.scan_layers, bool), "scan_layers", "must be True or False")
  need(c.moe_matmul in MOE_MATMULS, "moe_matmul", f"must be one of {MOE_MATMULS}")


# hidden / layers / heads / ffn, from the design notes; MoE presets add experts, top-k.
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024),
    "small": dict(hidden_size=512, num_layers=8, num_heads=8, ffn_size=2048),
    "medium": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, ffn_size=4096),
    "xlarge": dict(hidden_size=2048, num_layers=24, num_heads=16, ffn_size=5504),
}
_PRESETS["tiny-moe"] = dict(_PRESETS["tiny"], num_experts=4, top_k=2)
_PRESETS["medium-moe"] = dict(_PRESETS["medium"], num_experts=8, top_k=2)
_PRESETS["large-moe"] = dict(_PRESETS["large"], num_experts=16, top_k=2)

PRESET_NAMES = tuple(_PRESETS)


def model_preset(name: str, **overrides: Any) -> ModelConfig:
  """A named preset (tiny ... xlarge, *-moe; `_` and `-` are interchangeable)."""
  key = name.replace("_", "-")
  if key not in _PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"model_preset({name!r}): unknown field(s) {sorted(unknown)}")
  return ModelConfig(**{**_PRESETS[key], **overrides})
