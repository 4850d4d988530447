"""Weight-only INT8 / INT4 quantization of a VesperLM for generation, with qwix.

`quantize_for_inference(model, "int8" | "int4")` returns a copy of the model whose
attention and FFN / expert matmul weights are stored as qwix `QArray`s: symmetric,
per output channel (one fp32 scale per output column of every layer, and of every expert),
absmax calibration (`qwix.quantize`). Reading such a weight inside the model (`w[...]`)
dequantizes it with `qwix.dequantize`, so every matmul form the model uses (einsum,
FlyLoRA's joint base + adapter matmul, the CPU row matmul, the experts' grouped matmuls)
runs unchanged in the compute dtype, inside the compiled step: the weights live in memory
as 8- or 4-bit integers, and where the layers run under `lax.scan` (decoding always does)
each step of the scan widens only its own layer's. `vesperjax.inference.sampling.generate` takes
the result as it takes any model.

Full precision stays on:

- the tied embedding / LM head: the same matrix is the input lookup and the output
  projection, so its error lands on every logit directly, unattenuated by any later
  layer;
- LayerNorm scales and all biases: vectors, a negligible share of the bytes;
- the MoE router: its output picks the top-k experts, a discrete choice that a small
  weight error flips, swapping a token's whole FFN;
- FlyLoRA's frozen sparse random projection A (its output likewise picks the top-k
  ranks) and the trained up-projection B (rank x width, a few percent of the FFN);
- the metacognition head, when present: a small head whose output is a probability
  read directly.

Why not qwix's interception (`qwix.quantize_model` with a `PtqProvider`): it replaces a
parameter by assigning the quantized one on the module that runs the matmul during a
first call. Here each layer runs as a copy merged from the stacked parameters inside
`lax.scan`, so the assignment never reaches the stacked weights; and the FFN's matmuls
are not the intercepted `jnp.einsum` / `jnp.dot` / `lax.dot_general` calls on a
parameter (FlyLoRA concatenates the base kernel with B before its matmul; the row and
grouped matmuls are `vesperjax.kernels` forms). Storing qwix arrays that dequantize on
read quantizes exactly the weights named here, whatever matmul reads them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

MODES = ("int8", "int4")
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
_INSTALL_HINT = "pip install 'vesperjax[quantize]'"


class QuantizedWeight(nnx.Variable):
  """A weight held as a qwix `QArray`; reading it (`w[...]`) returns the dequantized
  array in the scale's dtype (fp32). Not a `Param`: a quantized model does not train."""

  def get_value(self, **kwargs):
    import qwix  # present: only a quantized model holds one
    index = kwargs.pop("index", ...)
    value = qwix.dequantize(super().get_value(**kwargs))
    return value if index is ... else value[index]


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """Where one quantized weight lives and which of its axes a matmul contracts."""
  module: tuple[str, ...]  # attribute path from the model
  name: str
  contracted: tuple[int, ...]  # axes of one layer's weight summed over by its matmul


def quantized_tensors(config) -> tuple[QuantizedTensor, ...]:
  """The weights `quantize_for_inference` quantizes for a model of `config`.

  Shapes of one layer's weights (the stack adds a leading layers axis): qkv [D, 3, H, Dh]
  and out [H, Dh, D]; dense FFN gate/up [D, F], down [F, D]; experts gate/up [E, D, F],
  down [E, F, D]. Every axis not contracted gets its own scale, so scales are per layer,
  per expert and per output channel.
  """
  e = 1 if config.is_moe else 0  # the experts axis leads the FFN weights
  return (
      QuantizedTensor(("blocks", "attn"), "qkv_kernel", (0,)),
      QuantizedTensor(("blocks", "attn"), "out_kernel", (0, 1)),
      QuantizedTensor(("blocks", "ffn", "gate"), "kernel", (e,)),
      QuantizedTensor(("blocks", "ffn", "up"), "kernel", (e,)),
      QuantizedTensor(("blocks", "ffn"), "down_kernel", (e,)),
  )


def require_qwix():
  """The qwix module, or a ValueError naming the extra that installs it."""
  try:
    import qwix
  except ImportError:
    raise ValueError(f"quantization needs the qwix package: {_INSTALL_HINT}") from None
  return qwix


def quantize_array(weight, mode: str, contracted):
  """The qwix `QArray` of `weight` in `mode` ("int8" | "int4"): symmetric absmax, one
  fp32 scale per index of every axis not in `contracted` (axes of `weight` itself).
  The one quantizer behind `quantize_for_inference` and `vesperjax.export --quantize`;
  scales depend only on their own channel, so quantizing one layer of a stack gives that
  layer's slice of the stack's result."""
  qwix = require_qwix()
  channels = tuple(a for a in range(weight.ndim) if a not in set(contracted))
  return qwix.quantize(weight.astype(jnp.float32), _QTYPES[mode],
                       channelwise_axes=channels, calibration_method="absmax")


def quantization_mode(model) -> str | None:
  """"int8" or "int4" if `model`'s weights are already quantized, else None."""
  t = quantized_tensors(model.config)[0]
  module = model
  for attr in t.module:
    module = getattr(module, attr)
  weight = getattr(module, t.name)
  if not isinstance(weight, QuantizedWeight):
    return None
  qtype = jnp.dtype(weight.get_raw_value().qtype)
  return next(m for m, q in _QTYPES.items() if jnp.dtype(q) == qtype)


def quantize_for_inference(model, mode: str | None):
  """`model` with its attention and FFN / expert matmul weights quantized to `mode`.

  mode: "int8", "int4" (weight-only, symmetric, per output channel, qwix absmax) or
  None (the model itself, unchanged). Returns a new model; `model` is left as it was.
  The result runs under `vesperjax.inference.sampling.generate` and `model(tokens)` like the
  original, in the config's compute dtype, and is for inference only (its quantized
  weights are not `nnx.Param`s). A model already quantized to `mode` (a quantized
  export) is returned as it is; one quantized to the other mode raises ValueError, since
  re-quantizing its codes would compound two roundings. Raises ValueError for another
  mode or without qwix.
  """
  if mode is None:
    return model
  if mode not in MODES:
    raise ValueError(f"quantization mode must be one of {', '.join(MODES)}; got {mode!r}")
  require_qwix()
  current = quantization_mode(model)
  if current == mode:
    return model
  if current is not None:
    raise ValueError(f"this model is already quantized to {current}; re-quantizing it to "
                     f"{mode} would round twice: quantize the unquantized model (the run "
                     f"directory, or an export without --quantize) to {mode} instead")
  quantized = nnx.clone(model)
  for t in quantized_tensors(model.config):
    module = quantized
    for attr in t.module:
      module = getattr(module, attr)
    weight = getattr(module, t.name)[...]  # stacked: [layers, *one layer's shape]
    qarray = quantize_array(weight, mode, [a + 1 for a in t.contracted])
    setattr(module, t.name, QuantizedWeight(qarray))
  return quantized


def weight_bytes(model) -> int:
  """Bytes of the model's arrays as stored (int4 counted at half a byte)."""
  total = 0
  for leaf in jax.tree.leaves(nnx.state(model)):
    bits = 4 if leaf.dtype == jnp.int4 else leaf.dtype.itemsize * 8
    total += leaf.size * bits // 8
  return total
