"""Data benchmark: token-cache build speed (MB/s of text) and loader throughput (batches/s).

  python benchmarks/data_bench.py                       # stdlib, byte + bpe:8192
  python benchmarks/data_bench.py --dataset my.txt --tokenizers bpe:8192 --workers 0 2

Builds into a fresh temp dir each run (so nothing is reused), then times the grain
pipeline over the bpe/last cache for each (seq_len, batch, workers) setting.
"""
import argparse
import os
import shlex
import sys
import tempfile
import time

from vesperjax.data import sources, train_dataset
from vesperjax.data.cache import build
from vesperjax.data.cache import cache_path
from vesperjax.data.prepare import resolve_tokenizer


def bench_build(dataset, tok_spec, tmp):
  t0 = time.perf_counter()
  tok = resolve_tokenizer(tok_spec, dataset, tmp, progress=False)
  t_tok = time.perf_counter() - t0
  src = sources.open_source(dataset, "train")
  mb = sum(len(t.encode()) for t, _ in src.pieces()) / 1e6  # text bytes in the split
  t0 = time.perf_counter()
  cache = build(src, tok, cache_path(tmp, src, tok), progress=False)
  dt = time.perf_counter() - t0
  return cache, dict(tokenizer=tok_spec, text_mb=mb, tokens=cache.num_tokens,
                     prep_s=t_tok, build_s=dt, mb_s=mb / dt,
                     mtok_s=cache.num_tokens / dt / 1e6)


def bench_loader(cache, seq_len, batch, workers, seconds):
  it = iter(train_dataset(cache, seq_len, batch, seed=0, process_index=0,
                          process_count=1, num_workers=workers))
  next(it)  # start-up (worker processes) excluded
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  dt = time.perf_counter() - t0
  return dict(seq_len=seq_len, batch=batch, workers=workers, batches_s=n / dt,
              mtok_s=n * batch * seq_len / dt / 1e6)


def table(rows, cols):
  fmt = lambda v: f"{v:,.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(
      v, int) else str(v)
  cells = [[fmt(r[c]) for c in cols] for r in rows]
  w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
  print(" | ".join(c.rjust(w[i]) for i, c in enumerate(cols)))
  print("-|-".join("-" * x for x in w))
  for r in cells:
    print(" | ".join(v.rjust(w[i]) for i, v in enumerate(r)))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="stdlib")
  p.add_argument("--tokenizers", nargs="+", default=["byte", "bpe:8192"])
  p.add_argument("--seq-lens", nargs="+", type=int, default=[256, 1024])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
  p.add_argument("--seconds", type=float, default=3.0)
  a = p.parse_args()
  print("command: python " + " ".join(shlex.quote(x) for x in sys.argv))
  print(f"cpus: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as tmp:
    builds, cache = [], None
    for spec in a.tokenizers:
      cache, row = bench_build(a.dataset, spec, tmp)
      builds.append(row)
    print("\ncache build (train split; prep_s = tokenizer load/train)")
    table(builds, ["tokenizer", "text_mb", "tokens", "prep_s", "build_s", "mb_s", "mtok_s"])
    loads = [bench_loader(cache, s, a.batch, w, a.seconds)
             for s in a.seq_lens for w in a.workers]
    print(f"\nloader ({a.tokenizers[-1]} cache, host batch {a.batch})")
    table(loads, ["seq_len", "batch", "workers", "batches_s", "mtok_s"])


if __name__ == "__main__":
  main()
