"""What the token cache's checksums cost: build a synthetic cache of --gb GB through the
real `cache.build` (its writes, per-chunk CRC32 and fsync; tokenizing is skipped: the ids
are random, so the build takes seconds instead of minutes), then time
`TokenCache.open(path, verify=True)` with the files in the page cache (warm) and after
they were evicted with posix_fadvise (cold, read from disk), against the header-only
open. Writes a JSON report (command, commit, date, machine) and prints it.

  nice python benchmarks/cache_verify_bench.py --gb 1 \\
      --json benchmarks/cache-verify/DATE.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling vs_original

from vesperjax.data import cache as cache_lib  # noqa: E402
from vs_original import machine_info, print_report  # noqa: E402
from vesperjax.data.cache import TokenCache  # noqa: E402

PIECE_TOKENS = 4 << 20  # ids per piece: 8 MiB of uint16, one write per piece


class SyntheticTokenizer:
  """Stands in for a Tokenizer: every text is 'encoded' to PIECE_TOKENS random ids."""
  vocab_size, eod_id, hash, dtype = 32000, 0, "synthetic", np.dtype(np.uint16)

  def __init__(self, seed: int = 0):
    self.ids = np.random.default_rng(seed).integers(1, self.vocab_size, PIECE_TOKENS,
                                                    dtype=np.uint16)

  def encode_batch(self, texts):
    return [self.ids for _ in texts]


class SyntheticSource:
  """Stands in for a data Source: `pieces` texts, each one document and one batch."""
  spec, name, split, val_percent, text_field = "synthetic", "synthetic", "all", 0.0, "text"

  def __init__(self, pieces: int):
    self.n = pieces
    self.text = "x" * cache_lib.BATCH_CHARS  # long enough to flush a batch on its own

  def pieces(self):
    for _ in range(self.n):
      yield self.text, True

  def text_bytes(self) -> int:
    return self.n * len(self.text)

  def fingerprint(self) -> list:
    return [["synthetic", self.n, 0, "0"]]


def evict(path: str) -> None:
  """Drop the cache's files from the page cache, so the next read comes from disk."""
  for name in (cache_lib.TOKENS, cache_lib.DOCS):
    fd = os.open(os.path.join(path, name), os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def timed(fn, repeats: int, before=None) -> list[float]:
  out = []
  for _ in range(repeats):
    if before:
      before()
    t0 = time.perf_counter()
    fn()
    out.append(round(time.perf_counter() - t0, 3))
  return out


def commit() -> str | None:
  p = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                     capture_output=True, text=True)
  return p.stdout.strip() if p.returncode == 0 else None


def run(args, argv: list[str]) -> dict:
  pieces = max(1, round(args.gb * 1e9 / (PIECE_TOKENS * 2)))
  report = dict(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      command=shlex.join(["python", os.path.relpath(os.path.abspath(__file__)), *argv]),
      commit=commit(), machine=dict(machine_info(), nice=os.nice(0)),
      setting=dict(gb=args.gb, chunk_bytes=cache_lib.CHECK_CHUNK,
                   verify_threads=min(8, os.cpu_count() or 1), repeats=args.repeats))
  with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
    path = os.path.join(scratch, "cache")
    t0 = time.perf_counter()
    c = cache_lib.build(SyntheticSource(pieces), SyntheticTokenizer(), path,
                        progress=False)
    build_s = round(time.perf_counter() - t0, 3)
    size = os.path.getsize(os.path.join(path, cache_lib.TOKENS))
    piece = SyntheticTokenizer().ids.tobytes()
    in_memory = timed(lambda: [zlib.crc32(piece) for _ in range(size // len(piece))],
                      1)  # the build's share: one thread, no disk
    header_only = timed(lambda: TokenCache.open(path), args.repeats)
    warm = timed(lambda: TokenCache.open(path, verify=True), args.repeats)
    cold = timed(lambda: TokenCache.open(path, verify=True), args.repeats,
                 before=lambda: evict(path))
    report["results"] = dict(
        tokens_bin_bytes=size, num_tokens=c.num_tokens,
        chunks=len(c.header["checksums"][cache_lib.TOKENS]),
        build_s=build_s, crc32_one_thread_in_memory_s=in_memory[0],
        open_header_only_s=header_only, verify_warm_s=warm, verify_cold_s=cold,
        verify_warm_gb_per_s=round(size / 1e9 / statistics.median(warm), 2),
        verify_cold_gb_per_s=round(size / 1e9 / statistics.median(cold), 2))
  report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
  return report


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gb", type=float, default=1.0, help="size of tokens.bin, in GB")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dir", default=None, help="scratch folder (default: the system's)")
  p.add_argument("--json", default=None, help="write the report here too")
  args = p.parse_args(argv)
  print_report(run(args, argv), args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
