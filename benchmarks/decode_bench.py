"""Decode speed of `vesperjax.sampling.generate` at batch 1 (random-init model).

  python benchmarks/decode_bench.py [--preset tiny] [--vocab 8192] [--tokens 256] [--unrolled]

Prints one JSON line: tokens/s of the compiled decode (median of --repeats calls, the
first call, which compiles, timed apart) for the while_loop path and the streaming
path (one jitted step per token, as `python -m vesperjax.generate` uses).
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
from vesperjax.sampling import generate  # noqa: E402


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
  p.add_argument("--unrolled", action="store_true", help="scan_layers=False")
  a = p.parse_args()
  config = vj.model_preset(a.preset, vocab_size=a.vocab, scan_layers=not a.unrolled)
  model = vj.VesperLM(config, rngs=nnx.Rngs(0))
  prompt = np.arange(a.prompt_len) % a.vocab
  kw = dict(max_new_tokens=a.tokens, temperature=a.temperature, top_k=a.top_k,
            top_p=a.top_p)
  out = dict(preset=a.preset, scan_layers=config.scan_layers, vocab=a.vocab, batch=1,
             prompt_len=a.prompt_len,
             new_tokens=a.tokens, backend=jax.default_backend())
  for name, cb in (("loop", None), ("streaming", lambda t: None)):
    times = []
    for i in range(a.repeats + 1):
      start = time.perf_counter()
      generate(model, prompt, seed=i, on_token=cb, **kw)
      times.append(time.perf_counter() - start)
    out[f"{name}_first_call_s"] = round(times[0], 3)
    out[f"{name}_tokens_per_s"] = round(a.tokens / float(np.median(times[1:])), 1)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
