"""VesperLM in PyTorch for Hugging Face Transformers (`trust_remote_code=True`).

Copied into an export written by `python -m vesperjax.export --format hf`; it needs
torch and transformers only. Written from vesperjax's model (vesperjax/model/) and the
export's tensor table (docs/export.md): the parameters carry the exported names and
layouts, so the safetensors files load as they are (kernels are `[in, out]`, used as
`x @ kernel`; the attention projections keep their head axes).

  logits = LN(blocks(embed[ids])) @ embed.T        (tied: `embed` is the LM head)
  block:   x + Attn(LN(x)), then x + FFN(LN(x)) or MoE(LN(x))
  Attn:    causal multi-head attention, split-half RoPE on q and k
  FFN:     down(ERA(gate(x)) * up(x)), ERA(x) = GELU_tanh(x) + gamma softplus(x)
  gate/up: FlyLoRA, x W + b + (alpha / r) B (mask * A x), A frozen sparse random, mask
           the `lora_topk` ranks with the largest |A x + routing_bias| per token
  MoE:     softmax router, top-k experts, weights renormalised to sum 1

Norms, RoPE, ERA, the rank and expert choices and the logits run in fp32 whatever the
parameter dtype, as in vesperjax. A padded batch (2-D `attention_mask`, left or right
padding) gives each row the positions it would have alone. Quantized exports load with
their int8 / int4 codes and scales and use `codes * scale` in each matmul.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_vesperlm import VesperLMConfig

# the name of the cache field of CausalLMOutputWithPast: "cache" in newer Transformers,
# "past_key_values" before; generate() reads the cache back from that field
_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                else "past_key_values")


def rope(x, positions, theta):
  """Rotate the two halves of each head (split-half layout), in fp32.
  x: [B, S, H, Dh]; positions: [B, S]."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
  angles = positions.to(torch.float32)[..., None] * inv_freq
  cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
  x1, x2 = x.to(torch.float32).chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def era(x, gamma):
  """GELU (tanh form) + gamma * softplus, in fp32, returned in x's dtype."""
  xf = x.to(torch.float32)
  return (F.gelu(xf, approximate="tanh") + gamma * F.softplus(xf)).to(x.dtype)


def rank_topk_mask(y, bias, k):
  """1 for the k ranks with the largest |y + bias| per row (ties to the lower index),
  else 0, in y's dtype. y: [N, R]; bias: [R] or [N, R]."""
  score = (y.to(torch.float32) + bias.to(torch.float32)).abs()
  r = score.shape[-1]
  mine, other = score[..., :, None], score[..., None, :]
  idx = torch.arange(r, device=y.device)
  earlier = idx[None, :] < idx[:, None]  # [mine, other]: other's index is lower
  beaten_by = (other > mine) | ((other == mine) & earlier)
  return (beaten_by.sum(-1) < k).to(y.dtype)


class Fp32Buffers(nn.Module):
  """A module whose buffers named in FP32 follow device moves (`model.to("cuda")`) but
  stay fp32 through dtype casts (`model.to(torch.bfloat16)`, `.half()`)."""
  FP32 = ()

  def _apply(self, fn, *args, **kwargs):
    kept = {n: b for n, b in self._buffers.items() if n in self.FP32 and b is not None}
    super()._apply(fn, *args, **kwargs)
    for n, b in kept.items():
      self._buffers[n] = b.to(self._buffers[n].device, torch.float32)
    return self


class Quantized(Fp32Buffers):
  """A weight stored as int8 codes (or int4 codes packed two per byte) and fp32 scales
  with size 1 on the contracted axes; `value()` is codes * scale."""
  FP32 = ("scale",)  # the exported scales, as vesperjax multiplies them

  def __init__(self, shape, contracted, bits):
    super().__init__()
    self.shape, self.bits = tuple(shape), bits
    stored = list(shape)
    if bits == 4:
      stored[-1] = (stored[-1] + 1) // 2
    self.register_buffer("qvalue", torch.zeros(stored, dtype=torch.int8 if bits == 8
                                               else torch.uint8))
    scale = [1 if i in contracted else n for i, n in enumerate(shape)]
    self.register_buffer("scale", torch.ones(scale, dtype=torch.float32))

  def value(self, dtype, e=None):
    """The weight (expert e's of a stacked one) in `dtype`."""
    codes, scale = self.qvalue, self.scale
    if e is not None:
      codes, scale = codes[e], scale[e]
    if self.bits == 4:  # low nibble: even index, high nibble: odd; 4-bit two's complement
      b = codes.to(torch.int16)
      codes = torch.stack([b & 0xF, b >> 4], -1).reshape(*b.shape[:-1], -1)
      codes = codes[..., :self.shape[-1]]
      codes = torch.where(codes > 7, codes - 16, codes)
    return (codes.to(torch.float32) * scale).to(dtype)


def _weight(module, name, shape, contracted, config):
  """Register `name` as a float Parameter, or as a Quantized module in a quantized
  export (the weights vesperjax quantizes: attention and FFN / expert matmuls)."""
  bits = {None: None, "int8": 8, "int4": 4}[config.quantization]
  if bits is None:
    setattr(module, name, nn.Parameter(torch.zeros(shape)))
  else:
    setattr(module, name, Quantized(shape, contracted, bits))


def _get(module, name, dtype, e=None):
  """Weight `name` of `module` (expert e's of a stacked one) in `dtype`."""
  w = getattr(module, name)
  if isinstance(w, Quantized):
    return w.value(dtype, e)
  return (w if e is None else w[e]).to(dtype)


class LayerNorm(nn.Module):

  def __init__(self, dim, eps):
    super().__init__()
    self.eps = eps
    self.scale = nn.Parameter(torch.ones(dim))
    self.bias = nn.Parameter(torch.zeros(dim))

  def forward(self, x):
    h = x.to(torch.float32)
    mean = h.mean(-1, keepdim=True)
    var = (h - mean).square().mean(-1, keepdim=True)
    h = (h - mean) * torch.rsqrt(var + self.eps)
    return (h * self.scale.to(torch.float32) + self.bias.to(torch.float32)).to(x.dtype)


class FlyLoRALinear(Fp32Buffers):
  """x W + b + (alpha / r) B (mask * A x); with `experts`, E such layers stacked
  ([E, ...] tensors) applied by `forward(x, e)` to the rows routed to expert e."""
  # A and the routing bias decide which ranks a token uses, a choice that a rounded
  # copy could flip
  FP32 = ("lora_a", "routing_bias")

  def __init__(self, d_in, d_out, config, experts=0):
    super().__init__()
    m = config.model
    lead = (experts,) if experts else ()
    self.rank, self.topk = m["lora_rank"], m["lora_topk"]
    self.scale = m["lora_alpha"] / self.rank if self.rank else 0.0
    _weight(self, "kernel", lead + (d_in, d_out), {len(lead)}, config)
    self.bias = nn.Parameter(torch.zeros(lead + (d_out,)))
    if self.rank:  # A and the routing bias never train: buffers, kept in fp32
      self.register_buffer("lora_a", torch.zeros(lead + (d_in, self.rank),
                                                 dtype=torch.float32))
      self.lora_b = nn.Parameter(torch.zeros(lead + (self.rank, d_out)))
      self.register_buffer("routing_bias", torch.zeros(lead + (self.rank,),
                                                       dtype=torch.float32))

  def forward(self, x, e=None):
    dt = x.dtype
    pick = (lambda t: t) if e is None else (lambda t: t[e])
    y = x @ _get(self, "kernel", dt, e) + pick(self.bias).to(dt)
    if self.rank:
      a = x @ pick(self.lora_a).to(dt)
      mask = rank_topk_mask(a, pick(self.routing_bias), self.topk)
      y = y + ((a * mask) * self.scale) @ pick(self.lora_b).to(dt)
    return y


class FeedForward(nn.Module):
  """GLU FFN, dense (`experts=0`) or E experts' weights stacked."""

  def __init__(self, config, experts=0):
    super().__init__()
    m = config.model
    d, f = m["hidden_size"], m["ffn_size"]
    lead = (experts,) if experts else ()
    self.gamma = m["era_gamma"]
    self.gate = FlyLoRALinear(d, f, config, experts)
    self.up = FlyLoRALinear(d, f, config, experts)
    _weight(self, "down_kernel", lead + (f, d), {len(lead)}, config)
    self.down_bias = nn.Parameter(torch.zeros(lead + (d,)))

  def expert(self, x, e=None):
    """The FFN (of expert e) on rows x [N, D]."""
    h = era(self.gate(x, e), self.gamma) * self.up(x, e)
    bias = self.down_bias if e is None else self.down_bias[e]
    return h @ _get(self, "down_kernel", x.dtype, e) + bias.to(x.dtype)

  def forward(self, x):
    return self.expert(x)


class MoE(FeedForward):
  """Router -> softmax -> top-k experts, weights renormalised; each expert runs on the
  rows routed to it only (no capacity limit: every assignment is kept)."""

  def __init__(self, config):
    m = config.model
    super().__init__(config, experts=m["num_experts"])
    self.num_experts, self.top_k = m["num_experts"], m["top_k"]
    self.router = nn.Parameter(torch.zeros(m["hidden_size"], m["num_experts"]))

  def forward(self, x):
    logits = x.to(torch.float32) @ self.router.to(x.dtype).to(torch.float32)
    top_p, top_e = logits.softmax(-1).topk(self.top_k, dim=-1)
    weights = (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(self.num_experts):
      rows, slot = torch.nonzero(top_e == e, as_tuple=True)
      if rows.numel():
        y.index_add_(0, rows, self.expert(x[rows], e) * weights[rows, slot, None])
    return y


class Attention(nn.Module):

  def __init__(self, config, layer_idx):
    super().__init__()
    m = config.model
    d, h = m["hidden_size"], m["num_heads"]
    self.heads, self.head_dim, self.theta = h, d // h, m["rope_theta"]
    self.layer_idx = layer_idx
    _weight(self, "qkv_kernel", (d, 3, h, d // h), {0}, config)
    self.qkv_bias = nn.Parameter(torch.zeros(3, h, d // h))
    _weight(self, "out_kernel", (h, d // h, d), {0, 1}, config)
    self.out_bias = nn.Parameter(torch.zeros(d))

  def forward(self, x, positions, allowed, cache):
    """x [B, S, D]; allowed [B, 1, S, T] (True: the query may see the key); cache: a
    transformers Cache or None."""
    dt = x.dtype
    qkv = torch.einsum("bsd,dthk->bsthk", x, _get(self, "qkv_kernel", dt))
    qkv = qkv + self.qkv_bias.to(dt)
    q, k, v = qkv.unbind(2)
    q, k = rope(q, positions, self.theta), rope(k, positions, self.theta)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
    if cache is not None:
      k, v = cache.update(k, v, self.layer_idx)
    scores = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)
              / math.sqrt(self.head_dim))
    # a finite fill: a query with no visible key (padding) gets uniform weights, not NaN
    scores = scores.masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = scores.softmax(-1).to(dt) @ v
    out = torch.einsum("bhsk,hkd->bsd", out, _get(self, "out_kernel", dt))
    return out + self.out_bias.to(dt)


class Block(nn.Module):

  def __init__(self, config, layer_idx):
    super().__init__()
    m = config.model
    self.attn_norm = LayerNorm(m["hidden_size"], m["norm_eps"])
    self.attn = Attention(config, layer_idx)
    self.ffn_norm = LayerNorm(m["hidden_size"], m["norm_eps"])
    self.ffn = MoE(config) if m["num_experts"] else FeedForward(config)

  def forward(self, x, positions, allowed, cache):
    x = x + self.attn(self.attn_norm(x), positions, allowed, cache)
    h = self.ffn_norm(x)
    return x + self.ffn(h.reshape(-1, h.shape[-1])).reshape(h.shape)


class MetaHead(nn.Module):
  """vesperjax's metacognition head: [hidden, top-1 log-prob / ln V, entropy / ln V]
  -> GELU MLP -> logits of (the top-1 guess is right, the document ends next)."""

  def __init__(self, config):
    super().__init__()
    d, v = config.model["hidden_size"], config.model["vocab_size"]
    width = max(16, d // 4)
    self.log_vocab = math.log(v)
    self.w_in = nn.Parameter(torch.zeros(d + 2, width))
    self.b_in = nn.Parameter(torch.zeros(width))
    self.w_out = nn.Parameter(torch.zeros(width, 2))
    self.b_out = nn.Parameter(torch.zeros(2))

  def forward(self, hidden, logits):
    logp = logits.to(torch.float32).log_softmax(-1)
    entropy = -torch.where(logp > -math.inf, logp.exp() * logp, 0.0).sum(-1)
    stats = torch.stack([logp.max(-1).values, entropy], -1) / self.log_vocab
    x = torch.cat([hidden.to(torch.float32), stats], -1)
    x = F.gelu(x @ self.w_in.float() + self.b_in.float(), approximate="tanh")
    return x @ self.w_out.float() + self.b_out.float()


class VesperLMPreTrainedModel(PreTrainedModel):
  config_class = VesperLMConfig
  base_model_prefix = "vesperlm"
  _no_split_modules = ["Block"]

  def _init_weights(self, module):
    """A fresh model (not loaded): vesperjax's init, normal(init_std) matrices, zero
    biases and B, unit norm scales; A sparse random, N(0, 1/r^2) on a `lora_density`
    share of each rank's inputs."""
    std = self.config.model["init_std"]
    for name, p in module.named_parameters(recurse=False):
      with torch.no_grad():
        if name == "scale":
          p.fill_(1.0)
        elif name in ("embed", "kernel", "qkv_kernel", "out_kernel", "down_kernel",
                      "router", "w_in"):
          p.normal_(0.0, std)
        else:
          p.zero_()
    if isinstance(module, FlyLoRALinear) and module.rank:
      with torch.no_grad():
        a = module.lora_a
        keep = max(1, int(a.shape[-2] * self.config.model["lora_density"]))
        u = torch.rand(a.shape)
        kth = u.sort(dim=-2).values[..., keep - 1:keep, :]
        a.copy_(torch.where(u <= kth, torch.randn(a.shape) / module.rank, 0.0))
        module.routing_bias.zero_()


class VesperLMForCausalLM(VesperLMPreTrainedModel, GenerationMixin):
  """The whole model; `forward` returns fp32 logits and, with `use_cache`, the cache."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    if config.quantization not in (None, "int8", "int4"):
      raise ValueError(f"VesperLM: quantization {config.quantization!r} is not one of "
                       "None, int8, int4")
    self.embed = nn.Parameter(torch.zeros(m["vocab_size"], m["hidden_size"]))
    self.layers = nn.ModuleList(Block(config, i) for i in range(m["num_layers"]))
    self.final_norm = LayerNorm(m["hidden_size"], m["norm_eps"])
    if m["meta_head"]:
      self.meta_head = MetaHead(config)
    self.post_init()

  def get_input_embeddings(self):
    return nn.Embedding.from_pretrained(self.embed, freeze=False)

  def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None):
    """Final-norm hidden states [B, S, D] (the parameters' dtype)."""
    b, s = input_ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    total = past + s
    if attention_mask is None:
      attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != total:
      raise ValueError(f"VesperLM: attention_mask must be [batch, {total}] (past and new "
                       f"tokens), got {list(attention_mask.shape)}")
    valid = attention_mask.bool()
    if position_ids is None:  # each row's own count of valid tokens: padding skipped
      position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    query = past + torch.arange(s, device=input_ids.device)
    key = torch.arange(total, device=input_ids.device)
    allowed = (key[None, :] <= query[:, None])[None, None] & valid[:, None, None, :]
    x = self.embed[input_ids]
    for layer in self.layers:
      x = layer(x, position_ids, allowed, cache)
    return self.final_norm(x)

  def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
              past_key_values=None, use_cache=None, labels=None, return_dict=True,
              **kwargs):
    if input_ids is None:
      raise ValueError("VesperLM: pass input_ids (inputs_embeds is not supported)")
    cache = cache if cache is not None else past_key_values
    if use_cache is None:  # newer Transformers keep use_cache in the generation config
      use_cache = getattr(self.config, "use_cache", False)
    if use_cache and cache is None:
      cache = _new_cache(self.config)
    hidden = self.hidden_states(input_ids, attention_mask, position_ids,
                                cache if use_cache else None)
    # the tied head in fp32 (exact products of the stored values, fp32 sums)
    logits = hidden.to(torch.float32) @ self.embed.to(torch.float32).T
    loss = None
    if labels is not None:  # next-token loss, -100 ignored (Transformers' convention)
      loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits,
                                  **{_CACHE_FIELD: cache if use_cache else None})

  def meta_logits(self, input_ids, attention_mask=None):
    """The metacognition head's event logits [B, S, 2] fp32 (a model exported with
    `model.meta_head=True`)."""
    if not hasattr(self, "meta_head"):
      raise ValueError("VesperLM: this model has no metacognition head")
    hidden = self.hidden_states(input_ids, attention_mask)
    logits = hidden.to(torch.float32) @ self.embed.to(torch.float32).T
    return self.meta_head(hidden, logits)


def _new_cache(config):
  from transformers import DynamicCache
  try:
    return DynamicCache(config=config)
  except TypeError:  # older Transformers: no config argument
    return DynamicCache()
