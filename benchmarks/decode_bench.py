"""Decode speed of `vesperjax.inference.sampling.generate` at batch 1 (random-init model).

  python benchmarks/decode_bench.py [--preset tiny] [--vocab 8192] [--tokens 256]
      [--unrolled] [--repetition-penalty 1.0] [--paths loop,streaming]

Prints one JSON line: the model's shape, and per path the tokens/s of the median of
--repeats calls (new tokens / wall time of one generate() call, prompt included), each
call's seconds, and the first call (which compiles) timed apart. Paths: `loop` (one
`lax.while_loop`, no on_token) and `streaming` (the same loop with an `on_token` that
does nothing, as `python -m vesperjax.generate` streams). benchmarks/decode_vs_original.py
runs this as vesperjax's side.
"""
import argparse
import json
import time

from vesperjax.host_memory import keep_freed_memory

keep_freed_memory()  # before numpy/XLA start threads (see vesperjax/host_memory.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import vesperjax as vj  # noqa: E402
from vesperjax.model.size import num_params  # noqa: E402
from vesperjax.inference.sampling import generate  # noqa: E402

PATHS = {"loop": None, "streaming": lambda t: None}


def model_shape(config) -> dict:
  """The fields benchmarks/vs_original.py compares, for this config."""
  return dict(vocab=config.vocab_size, hidden=config.hidden_size, layers=config.num_layers,
              heads=config.num_heads, ffn=config.ffn_size, lora_rank=config.lora_rank,
              experts=config.num_experts, params=int(num_params(config)))


def time_paths(model, prompt, new_tokens: int, repeats: int, paths, **sampling) -> dict:
  """Per path: first call's seconds, each later call's, and tokens/s of their median."""
  out = {}
  for name in paths:
    times = []
    for i in range(repeats + 1):
      start = time.perf_counter()
      got = generate(model, prompt, max_new_tokens=new_tokens, seed=i,
                     on_token=PATHS[name], **sampling)
      times.append(time.perf_counter() - start)
      assert got.shape[1] == new_tokens, got.shape  # no eos: every call makes them all
    out[f"{name}_first_call_s"] = round(times[0], 3)
    out[f"{name}_call_s"] = [round(t, 4) for t in times[1:]]
    out[f"{name}_tokens_per_s"] = round(new_tokens / float(np.median(times[1:])), 1)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="tiny")
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--prompt-len", type=int, default=16)
  p.add_argument("--tokens", type=int, default=256)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-k", type=int, default=40)
  p.add_argument("--top-p", type=float, default=0.95)
  p.add_argument("--repetition-penalty", type=float, default=1.0)
  p.add_argument("--paths", default="loop,streaming", help="loop, streaming or both")
  p.add_argument("--unrolled", action="store_true", help="scan_layers=False")
  a = p.parse_args()
  paths = [x.strip() for x in a.paths.split(",") if x.strip()]
  if not paths or set(paths) - set(PATHS):
    p.error(f"--paths {a.paths}: choose from loop, streaming")
  config = vj.model_preset(a.preset, vocab_size=a.vocab, scan_layers=not a.unrolled)
  model = vj.VesperLM(config, rngs=nnx.Rngs(0))
  prompt = np.arange(a.prompt_len) % a.vocab
  out = dict(preset=a.preset, scan_layers=config.scan_layers, vocab=a.vocab, batch=1,
             prompt_len=a.prompt_len, new_tokens=a.tokens, temperature=a.temperature,
             top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
             backend=jax.default_backend(), jax=jax.__version__, shape=model_shape(config))
  out.update(time_paths(model, prompt, a.tokens, a.repeats, paths,
                        temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                        repetition_penalty=a.repetition_penalty))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
