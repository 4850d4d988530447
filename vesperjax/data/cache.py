"""Memory-mapped token cache: tokenize once, reuse while inputs are unchanged.

Layout of one cache directory (see docs/data.md):
  header.json  format version, tokenizer hash, source fingerprint (path, size, mtime_ns
               and a content digest per file), token/document counts, dtype, vocab
               size, key, the CRC32 of every CHECK_CHUNK bytes of each .bin file, and
               the CRC32 of the header's own other fields
  tokens.bin   flat little-endian uint16 (vocab <= 65536) or uint32 token ids;
               every document is followed by the end-of-document token
  docs.bin     int64 start offset of every document in tokens.bin

A cache is built into a sibling temp directory and renamed into place when complete,
so a crash leaves no half-written cache. On open, a header that does not parse, a
version / tokenizer / source mismatch, or file sizes that disagree with the header
mark the cache stale: `build_or_load` rebuilds it, `TokenCache.open` raises.

Integrity: the checksums are taken while the files are written and verified in full
when `build_or_load` opens a cache (`TokenCache.open(..., verify=True)`), because a
full pass is cheap (0.9 s per GB from the page cache, 2.1 s from disk, on a loaded
2-core VM: benchmarks/cache-verify/) while checking chunks as they are first read would
put that cost inside grain's random window reads, in every worker, and find damage
only after steps had trained. Per-chunk sums (not one per file) let threads share the
work (zlib releases the GIL) and name the damaged byte range.
Damage found at open rebuilds the cache, like any stale one; ids changed after the
open are caught where windows are read (`TokenCache.read`): an id outside the
vocabulary is named, never left to become NaN losses that look like a divergence.
"""
import glob
import hashlib
import json
import mmap
import os
import shutil
import sys
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from vesperjax.data import errors
from vesperjax.data.sources import Source
from vesperjax.data.tokenizer import Tokenizer

FORMAT_VERSION = 2  # 2 added the checksums; a version-1 cache is stale (rebuilt)
KEY_VERSION = 1  # in the directory name: a format change rebuilds in place, orphans none
HEADER, TOKENS, DOCS = "header.json", "tokens.bin", "docs.bin"
CHECK_CHUNK = 16 << 20  # bytes per CRC32: ~64 sums per GB, a damaged range named to 16 MiB
BATCH_CHARS = 8 << 20  # text per encode_batch call: bounds memory while building


class TokenCache:
  """A built cache: header fields plus lazily opened memmaps (cheap to pickle)."""

  def __init__(self, path: str, header: dict):
    self.path = path
    self.header = header
    self._tokens = None
    self._docs = None

  @property
  def num_tokens(self) -> int:
    return self.header["num_tokens"]

  @property
  def num_docs(self) -> int:
    return self.header["num_docs"]

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.header["dtype"])

  @property
  def vocab_size(self) -> int:
    return self.header["vocab_size"]

  @property
  def eod_id(self) -> int:
    return self.header["eod_id"]

  @property
  def tokens(self) -> np.ndarray:
    """The flat token stream, memory-mapped read-only on first use (per process)."""
    if self._tokens is None:
      self._tokens = _memmap(os.path.join(self.path, TOKENS), self.dtype, self.num_tokens)
    return self._tokens

  @property
  def doc_offsets(self) -> np.ndarray:
    if self._docs is None:
      self._docs = _memmap(os.path.join(self.path, DOCS), np.int64, self.num_docs)
    return self._docs

  def read(self, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop] as int32, each id checked against the vocabulary: a file
    changed after it was verified must fail here, naming itself, and not as NaN losses
    (one max over a window is little beside copying it)."""
    raw = self.tokens[start:stop]
    if raw.size and int(raw.max()) >= self.vocab_size:
      at = int(np.argmax(raw >= self.vocab_size))
      raise errors.DamagedCacheError(
          f"{os.path.join(self.path, TOKENS)}: token id {int(raw[at])} at token "
          f"{start + at} is outside the tokenizer's vocabulary of {self.vocab_size} ids "
          "(the file changed after its checksums were verified)", self.path)
    return np.asarray(raw, np.int32)

  def nbytes_on_disk(self) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(self.path, "*")))

  def __getstate__(self):
    # Never pickle a memmap: it would copy the whole array into every worker.
    return {"path": self.path, "header": self.header, "_tokens": None, "_docs": None}

  def __len__(self):
    return self.num_tokens

  def __repr__(self):
    return (f"TokenCache({self.path!r}, tokens={self.num_tokens}, docs={self.num_docs}, "
            f"dtype={self.dtype.name}, vocab={self.vocab_size})")

  @classmethod
  def open(cls, path: str, expect: dict | None = None, *,
           verify: bool = False) -> "TokenCache":
    """Open and validate a cache; `expect` header fields must match. Raises CacheError
    (DamagedCacheError for bytes that differ from their checksums). `verify`: also
    check the header's and every chunk's CRC32, a full read (`build_or_load` does);
    without it only the header is read (what a token count needs)."""
    hp = os.path.join(path, HEADER)
    if not os.path.isfile(hp):
      raise errors.CacheError(f"{path}: not a token cache (no {HEADER})")
    try:
      with open(hp, encoding="utf-8") as f:
        header = json.load(f)
      n, d, dt = header["num_tokens"], header["num_docs"], np.dtype(header["dtype"])
    except (ValueError, KeyError, TypeError) as e:
      raise errors.CacheError(f"{hp}: corrupt header ({type(e).__name__}: {e})") from None
    version = header.get("format_version")
    if version != FORMAT_VERSION:
      raise errors.CacheError(f"{hp}: format version {version} != {FORMAT_VERSION}" + (
          " (built without checksums)" if version == 1 else ""))
    if verify and header.get("header_crc32") != _header_crc(header):
      raise errors.DamagedCacheError(
          f"{hp}: its fields differ from the checksum recorded with them (damaged or "
          "edited)", path)
    for k, v in (expect or {}).items():
      if header.get(k) != v:
        raise errors.CacheError(f"{path}: {k} changed (cache is stale)")
    for name, size in ((TOKENS, n * dt.itemsize), (DOCS, d * 8)):
      p = os.path.join(path, name)
      actual = os.path.getsize(p) if os.path.exists(p) else -1
      if actual != size:
        raise errors.CacheError(f"{p}: {actual} bytes, header says {size} (corrupt)")
    if verify:
      _verify(path, header)
    return cls(path, header)


def _header_crc(header: dict) -> int:
  """CRC32 of the header's other fields as canonical JSON (key order, spacing aside)."""
  rest = {k: v for k, v in header.items() if k != "header_crc32"}
  return zlib.crc32(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode())


def _verify(path: str, header: dict) -> None:
  """Every CHECK_CHUNK-byte chunk's CRC32 against the header's."""
  sums = header["checksums"]  # present: the header's own CRC covered it
  chunk = sums["chunk_bytes"]
  for name in (TOKENS, DOCS):
    p = os.path.join(path, name)
    size, want = os.path.getsize(p), sums[name]
    if len(want) != -(-size // chunk):
      raise errors.DamagedCacheError(
          f"{path}/{HEADER}: {len(want)} checksums for {name}, whose {size} bytes make "
          f"{-(-size // chunk)} chunks", path)
    if size == 0:
      continue
    with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
      bad = _first_bad_chunk(mm, chunk, want)
    if bad is not None:
      raise errors.DamagedCacheError(
          f"{p}: bytes {bad}-{min(bad + chunk, size) - 1} differ from the checksum "
          "recorded when the cache was built (damaged on disk)", path)


def _first_bad_chunk(mm: mmap.mmap, chunk: int, want: list[int]) -> int | None:
  """Offset of the first chunk whose CRC32 is not `want`'s, None if all match. Threads
  share the chunks (zlib releases the GIL) and read the mapping in place (no copies)."""
  view = memoryview(mm)
  pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
  try:
    crcs = pool.map(lambda at: zlib.crc32(view[at:at + chunk]), range(0, len(mm), chunk))
    for i, (crc, expected) in enumerate(zip(crcs, want)):
      if crc != expected:
        return i * chunk
    return None
  finally:
    pool.shutdown(wait=True, cancel_futures=True)  # a damaged chunk stops the reading
    view.release()  # before the mapping closes


class _Checksummed:
  """A file written front to back, taking the CRC32 of every CHECK_CHUNK bytes."""

  def __init__(self, f):
    self.f, self.chunk = f, CHECK_CHUNK
    self.sums, self.crc, self.filled = [], 0, 0

  def write(self, data: bytes) -> None:
    self.f.write(data)
    view = memoryview(data)
    while len(view):
      take = min(len(view), self.chunk - self.filled)
      self.crc = zlib.crc32(view[:take], self.crc)
      self.filled += take
      view = view[take:]
      if self.filled == self.chunk:
        self.sums.append(self.crc)
        self.crc = self.filled = 0

  def checksums(self) -> list[int]:
    return self.sums + ([self.crc] if self.filled else [])


def _memmap(path, dtype, n):
  if n == 0:
    return np.zeros((0,), dtype)
  return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def cache_key(source: Source, tok: Tokenizer) -> str:
  """What the cache directory is named by: spec, split, tokenizer (not file stats)."""
  ident = json.dumps([KEY_VERSION, source.spec, source.split, source.val_percent,
                      source.text_field, tok.hash])
  return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, source: Source, tok: Tokenizer) -> str:
  return os.path.join(cache_dir, f"{source.name}-{source.split}-{cache_key(source, tok)}")


def build_or_load(source: Source, tok: Tokenizer, cache_dir: str,
                  progress: bool = True) -> TokenCache:
  """Reuse the cache for (source, tokenizer) if valid, current and intact (its checksums
  verified), else (re)build it, saying why on stderr."""
  path = cache_path(cache_dir, source, tok)
  expect = {"key": cache_key(source, tok), "tokenizer_hash": tok.hash,
            "sources": source.fingerprint()}
  if os.path.exists(path):
    try:
      return TokenCache.open(path, expect, verify=True)
    except errors.CacheError as e:
      print(f"rebuilding token cache: {getattr(e, 'damage', e)}", file=sys.stderr)
  return build(source, tok, path, progress=progress, fingerprint=expect["sources"])


def build(source: Source, tok: Tokenizer, path: str, progress: bool = True, *,
          fingerprint: list | None = None) -> TokenCache:
  """Tokenize `source` into a new cache at `path` (atomically replacing any old one).
  `fingerprint`: the source's, when the caller has just taken it (it reads the files).
  A full disk raises DiskFullError (one line: the cache, the stage, the space free)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  _remove_stale_temps(path)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    os.makedirs(tmp)
    header = _write(source, tok, tmp, progress,
                    source.fingerprint() if fingerprint is None else fingerprint)
    _atomic_swap(tmp, path)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    full = errors.disk_full(
        e, path, f"tokenizing {source.name}:{source.split} into a token cache")
    if full is not None:
      raise full from None
    raise
  return TokenCache(path, header)


def _write(source: Source, tok: Tokenizer, out: str, progress: bool,
           fingerprint: list) -> dict:
  t0 = time.perf_counter()
  share = {"all": 1.0, "train": 1 - source.val_percent / 100,
           "val": source.val_percent / 100}[source.split]  # a progress estimate only
  bar = tqdm(total=int(share * source.text_bytes()), unit="B",
             unit_scale=True,
             desc=f"tokenizing {source.name}:{source.split}", disable=not progress,
             leave=False, file=sys.stderr)
  try:  # the bar is closed before any error line, which would otherwise follow it
    with open(os.path.join(out, TOKENS), "wb") as ft, \
         open(os.path.join(out, DOCS), "wb") as fd:
      tokens, docs = _Checksummed(ft), _Checksummed(fd)
      n_tokens, n_docs = _tokenize(source, tok, tokens, docs, bar)
      for f in (ft, fd):
        f.flush()
        os.fsync(f.fileno())
  finally:
    bar.close()
  if n_docs == 0:
    raise errors.EmptySourceError(f"{source.spec}: no text in the {source.split!r} split")
  header = {
      "format_version": FORMAT_VERSION,
      "key": cache_key(source, tok),
      "dataset": source.spec,
      "split": source.split,
      "val_percent": source.val_percent,
      "text_field": source.text_field,
      "tokenizer_hash": tok.hash,
      "vocab_size": tok.vocab_size,
      "eod_id": tok.eod_id,
      "dtype": tok.dtype.name,
      "num_tokens": n_tokens,
      "num_docs": n_docs,
      "sources": fingerprint,
      "build_seconds": round(time.perf_counter() - t0, 3),
      "checksums": {"algorithm": "crc32", "chunk_bytes": tokens.chunk,
                    TOKENS: tokens.checksums(), DOCS: docs.checksums()},
  }
  header["header_crc32"] = _header_crc(header)
  with open(os.path.join(out, HEADER), "w", encoding="utf-8") as f:
    json.dump(header, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  return header


def _tokenize(source: Source, tok: Tokenizer, tokens: _Checksummed, docs: _Checksummed,
              bar) -> tuple[int, int]:
  """Encode `source` in batches of ~BATCH_CHARS, appending ids (EOD after every
  document) to `tokens` and document starts to `docs`; -> (tokens, documents)."""
  dtype = tok.dtype
  eod = np.array([tok.eod_id], dtype)
  n_tokens = n_docs = 0

  def flush(texts, ends, at_start):
    """Encode a batch of pieces and append; returns whether the next piece starts a doc."""
    nonlocal n_tokens, n_docs
    parts, starts, pos = [], [], n_tokens
    for ids, end in zip(tok.encode_batch(texts), ends):
      if at_start:
        starts.append(pos)
      parts.append(np.asarray(ids, dtype))
      pos += len(ids)
      if end:
        parts.append(eod)
        pos += 1
      at_start = end
    tokens.write(np.concatenate(parts).tobytes())
    docs.write(np.asarray(starts, np.int64).tobytes())
    n_tokens, n_docs = pos, n_docs + len(starts)
    bar.update(sum(len(t.encode("utf-8", "replace")) for t in texts))
    return at_start

  texts, ends, chars, at_start = [], [], 0, True
  for text, end in source.pieces():
    texts.append(text)
    ends.append(end)
    chars += len(text)
    if chars >= BATCH_CHARS:
      at_start = flush(texts, ends, at_start)
      texts, ends, chars = [], [], 0
  if texts:
    flush(texts, ends, at_start)
  return n_tokens, n_docs


def _atomic_swap(tmp: str, path: str) -> None:
  """Rename the finished temp dir into place; an old cache is moved aside first."""
  old = None
  if os.path.exists(path):
    old = f"{path}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
  os.rename(tmp, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temps(path: str) -> None:
  """Delete temp/old dirs left by crashed builds (their pid is gone)."""
  for p in glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"):
    parts = p.rsplit(".tmp-", 1)
    if len(parts) == 2:
      try:
        pid = int(parts[1].split("-")[0])
        if pid != os.getpid():
          os.kill(pid, 0)
          continue  # that process is alive (maybe building right now): leave it
      except (ValueError, ProcessLookupError):
        pass
      except PermissionError:
        continue
    shutil.rmtree(p, ignore_errors=True)
