"""Data benchmark: token-cache build speed (MB/s of text) and loader throughput (batches/s).

  python benchmarks/data_bench.py                       # stdlib, byte + bpe:8192
  python benchmarks/data_bench.py --dataset my.txt --tokenizers bpe:8192 --workers 0 2
  python benchmarks/data_bench.py --mode formats        # the same text as .txt/.jsonl/
                                                        # Parquet/Arrow (needs pyarrow)

`--mode build` (the default) builds into a fresh temp dir each run (so nothing is
reused), then times the grain pipeline over the bpe/last cache for each (seq_len, batch,
workers) setting.

`--mode formats` writes the documents of `--dataset`'s train split (`--repeat` times) as
one .txt file (documents separated by blank lines), one .jsonl file, one Parquet file
(`--row-group-rows` rows a row group, snappy) and one Arrow IPC stream, then for each
tokenizer (trained once, on the .txt, outside the timing) times reading alone (the
source's pieces) and a fresh cache build of each file. The .txt splits documents that
hold blank lines into several, so it has more end-of-document tokens; the text is the
same.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time

from vesperjax.data import sources, train_dataset
from vesperjax.data.cache import build
from vesperjax.data.cache import cache_path
from vesperjax.data.prepare import resolve_tokenizer

FORMATS = ("txt", "jsonl", "parquet", "arrow")


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


def write_formats(documents, folder, row_group_rows):
  """The documents as corpus.txt / .jsonl / .parquet / .arrow in `folder`; their paths."""
  from vesperjax.data import columnar  # pylint: disable=g-import-not-at-top
  pa = columnar.pyarrow()
  paths = {k: os.path.join(folder, f"corpus.{k}") for k in FORMATS}
  with open(paths["txt"], "w", encoding="utf-8") as f:
    f.write("\n\n".join(documents))
  with open(paths["jsonl"], "w", encoding="utf-8") as f:
    for d in documents:
      f.write(json.dumps({"text": d}) + "\n")
  table = pa.table({"text": pa.array(documents, pa.large_string())})
  pa.parquet.write_table(table, paths["parquet"], row_group_size=row_group_rows)
  with pa.ipc.new_stream(paths["arrow"], table.schema) as w:
    for batch in table.to_batches(max_chunksize=row_group_rows):
      w.write_batch(batch)
  return paths


def bench_formats(a, tmp):
  """Rows of (format, tokenizer): read-only and cache-build speed of the same text."""
  src = sources.open_source(a.dataset, "train")
  documents = [d for d in src.documents() if d.strip()] * a.repeat
  paths = write_formats(documents, tmp, a.row_group_rows)
  text_mb = sum(len(d.encode()) for d in documents) / 1e6
  print(f"{len(documents):,} documents, {text_mb:.2f} MB of text; file sizes: "
        + ", ".join(f"{k} {os.path.getsize(p) / 1e6:.2f} MB" for k, p in paths.items()))
  rows = []
  for spec in a.tokenizers:
    tok = resolve_tokenizer(spec, paths["txt"] + ":all", tmp, progress=False)
    for kind in a.formats:
      source = sources.open_source(paths[kind], "all")
      t0 = time.perf_counter()
      read_mb = sum(len(t.encode()) for t, _ in source.pieces()) / 1e6
      read_s = time.perf_counter() - t0
      out = os.path.join(tmp, f"cache-{kind}-{spec.replace(':', '')}")
      t0 = time.perf_counter()
      cache = build(source, tok, out, progress=False)
      build_s = time.perf_counter() - t0
      rows.append(dict(format=kind, tokenizer=spec, file_mb=os.path.getsize(paths[kind]) / 1e6,
                       text_mb=read_mb, docs=cache.num_docs, tokens=cache.num_tokens,
                       read_mb_s=read_mb / read_s, build_s=build_s, mb_s=read_mb / build_s))
  return rows


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
  p.add_argument("--mode", choices=["build", "formats"], default="build")
  p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                 help="--mode formats: which files to time")
  p.add_argument("--repeat", type=int, default=1,
                 help="--mode formats: the documents this many times over")
  p.add_argument("--row-group-rows", type=int, default=1000,
                 help="--mode formats: rows a Parquet row group / Arrow record batch")
  a = p.parse_args()
  print("command: python " + " ".join(shlex.quote(x) for x in sys.argv))
  print(f"cpus: {os.cpu_count()}")
  with tempfile.TemporaryDirectory() as tmp:
    if a.mode == "formats":
      rows = bench_formats(a, tmp)
      print("\nsame text per format (read_mb_s: pieces alone; build_s, mb_s: fresh cache)")
      table(rows, ["format", "tokenizer", "file_mb", "text_mb", "docs", "tokens",
                   "read_mb_s", "build_s", "mb_s"])
      return
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
