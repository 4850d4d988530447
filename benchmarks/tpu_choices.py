"""The compiled evidence behind the `tpu` rows of `kernels/platform.py`'s CHOICES.

Compiles each candidate form of attention, the MoE grouped matmul and the linear
cross-entropy (forward + backward, bf16 operands as the model runs them on a TPU) for a
compile-only TPU chip (libtpu, no TPU: `pip install 'vesperjax[tpu-compile]'`) and
records what XLA:TPU reports: `cost_analysis()` FLOPs and bytes accessed,
`memory_analysis()` temporary bytes, the Mosaic TPU custom calls in the program, and
whether a [S, S] buffer exists. Compiler figures, not timings: no TPU has run them.
Writes a JSON report (command, commit, date, machine) and prints a table.

  nice python benchmarks/tpu_choices.py --topology v5e:2x2 \\
      --json benchmarks/tpu-choices/DATE.json

Caveat (seen in the report): XLA's cost analysis counts a Mosaic custom call's FLOPs
and bytes only as far as the kernel declares them (Pallas kernels declare none unless
given a cost estimate), so for kernel forms the temporary memory and the program's
structure are the comparable figures.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import re
import shlex
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no lock: nothing runs on a TPU
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.checkout import mount_kernels  # noqa: E402
from benchmarks.cache_verify_bench import commit, machine_info  # noqa: E402

mount_kernels()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vesperjax.config import model_preset  # noqa: E402
from vesperjax.kernels import GroupLayout, attention, linear_cross_entropy, platform  # noqa: E402

_CALL = re.compile(r'custom_call_target="([^"]+)"')
_BUFFER = re.compile(r"\b(?:f32|bf16)\[([\d,]+)\]")


def _device(topology):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  dev = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
  return NamedSharding(jax.sharding.Mesh([dev], ("x",)), P())


def _compiled(fn, args, on):
  """fwd+bwd of `fn` (summed output) compiled for the TPU chip `on`."""
  def loss(*xs):
    out = fn(*xs)
    return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(out))
  grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(
      i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))))
  abstract = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on) for a in args]
  t0 = time.perf_counter()
  # the chip as the default device, as on a TPU host: tokamax asks it which kernels apply
  with platform.use("tpu"), jax.default_device(on.mesh.devices.flat[0]):
    compiled = grad.trace(*abstract).lower().compile()
  return compiled, round(time.perf_counter() - t0, 1)


def _row(name, fn, args, on, square=None):
  try:
    compiled, seconds = _compiled(fn, args, on)
  except Exception as e:  # noqa: BLE001  (a candidate libtpu refuses: recorded as such)
    return dict(form=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
  text = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  calls = collections.Counter(_CALL.findall(text))
  row = dict(form=name, compile_s=seconds, gflops=round(cost.get("flops", 0) / 1e9, 2),
             gbytes_accessed=round(cost.get("bytes accessed", 0) / 1e9, 3),
             temp_mib=round(mem.temp_size_in_bytes / 2**20, 1),
             argument_mib=round(mem.argument_size_in_bytes / 2**20, 1),
             mosaic_calls=calls.get("tpu_custom_call", 0))
  if square:
    row["has_SxS_buffer"] = any(
        tuple(int(d) for d in dims.split(","))[-2:] == (square, square)
        for dims in _BUFFER.findall(text) if dims.count(",") >= 1)
  return row


def attention_rows(config, batch, seq, on):
  key = jax.random.key(0)
  shape = (batch, seq, config.num_heads, config.head_dim)
  qkv = [jax.random.normal(k, shape, jnp.bfloat16) for k in jax.random.split(key, 3)]
  return [_row(f"attention:{impl}", lambda q, k, v, impl=impl: attention(
      q, k, v, causal=True, implementation=impl), qkv, on, square=seq)
          for impl in ("xla", "blocked", "splash")]


def grouped_rows(preset, config, tokens, on):
  """One expert FFN matmul (D -> F) of `tokens` routed rows over G experts."""
  g, d, f = config.num_experts, config.hidden_size, config.ffn_size
  rows_m = tokens * config.top_k
  x = jnp.zeros((rows_m, d), jnp.bfloat16)
  w = jnp.zeros((g, d, f), jnp.bfloat16)
  sizes = jnp.full((g,), rows_m // g, jnp.int32)

  def form(impl):
    def fn(x, w, sizes):
      layout = GroupLayout(sizes, rows_m, impl=impl)
      return layout.from_groups(layout.matmul(layout.to_groups(x), w))
    return fn

  def every_expert(x, w, sizes):  # every expert on every row, each row keeps its own
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(rows_m), side="right")
    y = jnp.einsum("md,gdf->gmf", x, w)
    return jnp.take_along_axis(y, group[None, :, None], axis=0)[0]

  def tokamax_tpu(x, w, sizes):  # tokamax's Mosaic TPU kernel, its own backward
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.ragged_dot(x, w, sizes, implementation="mosaic")

  def megablox(x, w, sizes):
    from jax.experimental.pallas.ops.tpu import megablox as mb  # pylint: disable=g-import-not-at-top
    return mb.gmm(x, w, sizes, preferred_element_type=jnp.bfloat16)

  forms = {"ragged_dot": form("ragged_dot"), "blocked": form("blocked"),
           "megablox_gmm (not wired)": megablox,
           "tokamax mosaic_tpu (not wired)": tokamax_tpu,
           "every_expert (G x work)": every_expert}
  return [dict(_row(f"grouped_matmul:{name}", fn, (x, w, sizes), on), preset=preset)
          for name, fn in forms.items()]


def cross_entropy_rows(config, tokens, vocab, on):
  h = jnp.zeros((tokens, config.hidden_size), jnp.bfloat16)
  w = jnp.zeros((vocab, config.hidden_size), jnp.bfloat16)
  labels = jnp.zeros((tokens,), jnp.int32)
  forms = {"chunked": dict(impl="chunked", keep_logits=False),
           "chunked+keep_logits": dict(impl="chunked", keep_logits=True),
           "reference (full logits)": dict(impl="reference")}
  return [_row(f"cross_entropy:{name}", lambda h, w, l, kw=kw: linear_cross_entropy(
      h, w, l, **kw), (h, w, labels), on) for name, kw in forms.items()]


NOTES = {
    "cost_analysis": "XLA counts a Mosaic custom call's FLOPs and bytes as the kernel "
                     "declares them (splash declares almost none) and a while loop's "
                     "body once (the chunked cross-entropy's scans): compare those rows "
                     "by temp memory and structure, not FLOPs",
    "ragged_dot": "XLA:TPU runs ragged_dot's forward and dx as Mosaic grouped GEMMs "
                  "(ragged-dot custom calls, 1x each) but its weight gradient as a "
                  "convolution over a [G, rows, D] masked broadcast: G x that matmul",
    "per shard": "a Mosaic kernel cannot be partitioned by XLA: splash attention runs "
                 "inside a shard_map over the batch / head axes (vesperjax/model/"
                 "attention.py); megablox and tokamax's Mosaic TPU ragged_dot compile "
                 "here on one chip but are not wired (tokamax's TPU ragged_dot fails "
                 "jax's vma check inside the expert shard_map)",
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--topology", default="v5e:2x2", help="libtpu topology (one chip used)")
  p.add_argument("--preset", default="small", help="attention and CE shapes")
  p.add_argument("--moe-presets", default="medium-moe,large-moe",
                 help="grouped matmul shapes (comma-separated presets)")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--batch", type=int, default=4, help="sequences per chip")
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--json", help="write the report here")
  args = p.parse_args(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()  # tokamax reads absl flags; never parse this argv
  on = _device(args.topology)
  config = model_preset(args.preset)
  moes = {name: model_preset(name) for name in args.moe_presets.split(",")}
  tokens = args.batch * args.seq
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", os.path.relpath(os.path.abspath(__file__)),
                          *(argv if argv is not None else sys.argv[1:])]),
      commit=commit(), machine=machine_info(), jax=jax.__version__,
      libtpu=importlib.metadata.version("libtpu"), notes=NOTES,
      target=dict(topology=args.topology, device_kind=on.mesh.devices.flat[0].device_kind),
      shapes=dict(attention=f"{args.preset}: B={args.batch} S={args.seq} "
                            f"H={config.num_heads} D={config.head_dim}, causal",
                  grouped_matmul={name: f"{tokens} tokens x top-{m.top_k} over "
                                        f"G={m.num_experts}, D={m.hidden_size} -> "
                                        f"F={m.ffn_size}" for name, m in moes.items()},
                  cross_entropy=f"{args.preset}: N={tokens} D={config.hidden_size} "
                                f"V={args.vocab}"),
      rows=[])
  for rows in (attention_rows(config, args.batch, args.seq, on),
               *(grouped_rows(name, m, tokens, on) for name, m in moes.items()),
               cross_entropy_rows(config, tokens, args.vocab, on)):
    for row in rows:
      print(json.dumps(row), flush=True)
      report["rows"].append(row)
  report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
  return report


if __name__ == "__main__":
  main()
