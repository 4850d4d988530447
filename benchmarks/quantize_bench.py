"""Quantized generation: decode speed, memory, eval perplexity (fp32, bf16, int8, int4).

  python benchmarks/quantize_bench.py --workdir runs/tiny [--eval-batches 8]
  python benchmarks/quantize_bench.py --preset small [--vocab 8192]   # random init: no ppl

For each mode, from one model (a run's checkpoint, or a preset at random init):

- fp32: the model as trained; bf16: every parameter cast to bfloat16 and computed in it;
  int8 / int4: `vesperjax.inference.quantize.quantize_for_inference` (qwix, weight-only, per output
  channel), computed in the run's compute dtype.
- decode tokens/s: `vesperjax.inference.sampling.generate`, batch 1, a --prompt-len prompt, --tokens
  new tokens, greedy, the compiled loop (no on_token); the median of --repeats calls
  after one call that compiles;
- weights MiB: the model's arrays as stored (int4 at half a byte);
- decode-step MiB: `memory_analysis()` of one compiled decode step (a token through
  `hidden_states` with the KV cache, then `logits`): its arguments (weights and the
  cache), and its temporaries (for int8 / int4 this includes the weights widened for a
  layer's matmuls);
- eval perplexity: exp of the mean next-token loss over the run's validation cache, the
  first --eval-batches batches of the run's batch size and seq_len (the batches the
  trainer evaluates on); with --preset there is no trained model and this is skipped;
- greedy agreement: how many of the decode's tokens equal the fp32 model's.

Prints the command, the machine, a markdown table and one JSON line.
"""
import argparse
import json
import os
import platform
import sys
import time

from vesperjax.host_memory import keep_freed_memory

keep_freed_memory()  # before numpy/XLA start threads (see vesperjax/host_memory.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import vesperjax as vj  # noqa: E402
from vesperjax.inference.quantize import quantize_for_inference, weight_bytes  # noqa: E402
from vesperjax.inference.sampling import generate  # noqa: E402

MODES = ("fp32", "bf16", "int8", "int4")
MIB = 1 << 20


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  dev = jax.devices()[0]
  return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{dev.platform} ({dev.device_kind})")


def as_bf16(model):
  """The model with every floating parameter stored and computed in bfloat16."""
  config = model.config.replace(dtype="bfloat16")
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: vj.VesperLM(config, rngs=nnx.Rngs(0))))
  params, rest = nnx.state(model, nnx.Param, ...)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf16 = nnx.merge(graphdef, params, rest)
  bf16.eval()
  return bf16


def variant(model, mode: str):
  if mode == "fp32":
    return model
  if mode == "bf16":
    return as_bf16(model)
  return quantize_for_inference(model, mode)


def decode_step_memory(model, cache_len: int) -> dict:
  """Argument and temporary MiB of one compiled decode step (batch 1)."""
  graphdef, state = nnx.split(model)

  def step(state, cache, tok):
    m = nnx.merge(graphdef, state, copy=True)
    hidden, _, cache = m.hidden_states(tok, cache=cache)
    return m.logits(hidden), cache

  cache = jax.eval_shape(lambda: model.init_cache(1, cache_len))
  tok = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  stats = jax.jit(step).lower(state, cache, tok).compile().memory_analysis()
  if stats is None:
    return {"step_args_mib": None, "step_temp_mib": None}
  return {"step_args_mib": round(stats.argument_size_in_bytes / MIB, 2),
          "step_temp_mib": round(stats.temp_size_in_bytes / MIB, 2)}


def decode_speed(model, prompt, new_tokens: int, repeats: int):
  """(tokens/s of the median call, the last call's tokens), after a compiling call."""
  times, out = [], None
  for i in range(repeats + 1):
    start = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, seed=i)
    times.append(time.perf_counter() - start)
  return new_tokens / float(np.median(times[1:])), out


def eval_perplexity(model, val_cache, batch_size: int, seq_len: int, batches: int,
                    valid_vocab: int) -> float:
  from vesperjax import data as vdata
  from vesperjax.training.train_step import token_losses
  graphdef, state = nnx.split(model)

  @jax.jit
  def loss_sum(state, tokens):
    m = nnx.merge(graphdef, state, copy=True)
    m.eval()
    loss, _, _ = token_losses(m, tokens, valid_vocab, False)
    return loss.sum(), loss.size

  total, count = 0.0, 0
  for host in vdata.eval_batches(val_cache, batch_size, seq_len, batches):
    s, n = loss_sum(state, jnp.asarray(host, jnp.int32))
    total, count = total + float(s), count + int(n)
  return float(np.exp(total / count))


def load(a):
  """(model, validation cache or None, batch size, seq_len, valid vocab, prompt ids)."""
  if a.workdir:
    from vesperjax.inference.loading import load_model
    from vesperjax.training.build import prepare_data
    model, tokenizer, run = load_model(a.workdir, a.step)
    data = prepare_data(run, a.workdir, progress=False)
    val = data.val_cache
    prompt = None
    if val is not None:
      prompt = np.asarray(val.tokens[:a.prompt_len], np.int32)
    if prompt is None or len(prompt) < a.prompt_len:
      prompt = np.arange(a.prompt_len, dtype=np.int32) % tokenizer.vocab_size
    return (model, val, run.train.batch_size, run.data.seq_len, tokenizer.vocab_size,
            prompt)
  config = vj.model_preset(a.preset, vocab_size=a.vocab)
  model = vj.VesperLM(config, rngs=nnx.Rngs(0))
  model.eval()
  return model, None, 0, 0, a.vocab, np.arange(a.prompt_len, dtype=np.int32) % a.vocab


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a trained run (its latest checkpoint, or --step)")
  src.add_argument("--preset", help="a model preset at random init (no perplexity)")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--vocab", type=int, default=8192, help="with --preset")
  p.add_argument("--modes", default=",".join(MODES))
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--eval-batches", type=int, default=8)
  a = p.parse_args()
  modes = [m.strip() for m in a.modes.split(",") if m.strip()]
  if not modes or set(modes) - set(MODES):
    p.error(f"--modes {a.modes}: choose from {', '.join(MODES)}")
  if a.workdir and not os.path.isdir(a.workdir):
    p.error(f"--workdir {a.workdir}: no such directory")

  print("command: python " + " ".join(sys.argv))
  print(f"machine: {machine()}")
  model, val, batch_size, seq_len, valid_vocab, prompt = load(a)
  cache_len = min(model.config.max_seq_len, -(-(a.prompt_len + a.tokens) // 64) * 64)
  rows, reference = [], None
  for mode in modes:
    m = variant(model, mode)
    tps, out = decode_speed(m, prompt, a.tokens, a.repeats)
    if reference is None and mode == "fp32":
      reference = out
    row = dict(mode=mode, decode_tokens_per_s=round(tps, 1),
               weights_mib=round(weight_bytes(m) / MIB, 2),
               **decode_step_memory(m, cache_len))
    row["greedy_same_as_fp32"] = (None if reference is None
                                  else f"{int((out == reference).sum())}/{out.size}")
    row["eval_ppl"] = (None if val is None or a.eval_batches == 0 else round(
        eval_perplexity(m, val, batch_size, seq_len, a.eval_batches, valid_vocab), 3))
    rows.append(row)
    print(json.dumps(row), file=sys.stderr)

  cols = ["mode", "decode_tokens_per_s", "weights_mib", "step_args_mib", "step_temp_mib",
          "eval_ppl", "greedy_same_as_fp32"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    print("| " + " | ".join("n/a" if r[c] is None else str(r[c]) for c in cols) + " |")
  print(json.dumps(dict(workdir=a.workdir, preset=a.preset, step=a.step,
                        prompt_len=a.prompt_len, new_tokens=a.tokens, repeats=a.repeats,
                        eval_batches=a.eval_batches, batch_size=batch_size, seq_len=seq_len,
                        machine=machine(), rows=rows)))


if __name__ == "__main__":
  main()
