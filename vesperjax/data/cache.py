"""Memory-mapped token cache: tokenize once, reuse while inputs are unchanged.

Layout of one cache directory (see docs/data.md):
  header.json  format version, tokenizer hash, source fingerprint (path, size, mtime_ns
               and a content digest per file), token/document counts, dtype, vocab
               size, key
  tokens.bin   flat little-endian uint16 (vocab <= 65536) or uint32 token ids;
               every document is followed by the end-of-document token
  docs.bin     int64 start offset of every document in tokens.bin

A cache is built into a sibling temp directory and renamed into place when complete,
so a crash leaves no half-written cache. On open, a header that does not parse, a
version / tokenizer / source mismatch, or file sizes that disagree with the header
mark the cache stale: `build_or_load` rebuilds it, `TokenCache.open` raises.
"""
import glob
import hashlib
import json
import os
import shutil
import sys
import time
import uuid

import numpy as np
from tqdm import tqdm

from vesperjax.data import errors
from vesperjax.data.sources import Source
from vesperjax.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
HEADER, TOKENS, DOCS = "header.json", "tokens.bin", "docs.bin"
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
  def open(cls, path: str, expect: dict | None = None) -> "TokenCache":
    """Open and validate a cache; `expect` header fields must match. Raises CacheError."""
    hp = os.path.join(path, HEADER)
    if not os.path.isfile(hp):
      raise errors.CacheError(f"{path}: not a token cache (no {HEADER})")
    try:
      with open(hp, encoding="utf-8") as f:
        header = json.load(f)
      n, d, dt = header["num_tokens"], header["num_docs"], np.dtype(header["dtype"])
    except (ValueError, KeyError, TypeError) as e:
      raise errors.CacheError(f"{hp}: corrupt header ({type(e).__name__}: {e})") from None
    if header.get("format_version") != FORMAT_VERSION:
      raise errors.CacheError(f"{hp}: format version {header.get('format_version')} "
                              f"!= {FORMAT_VERSION}")
    for k, v in (expect or {}).items():
      if header.get(k) != v:
        raise errors.CacheError(f"{path}: {k} changed (cache is stale)")
    for name, size in ((TOKENS, n * dt.itemsize), (DOCS, d * 8)):
      p = os.path.join(path, name)
      actual = os.path.getsize(p) if os.path.exists(p) else -1
      if actual != size:
        raise errors.CacheError(f"{p}: {actual} bytes, header says {size} (corrupt)")
    return cls(path, header)


def _memmap(path, dtype, n):
  if n == 0:
    return np.zeros((0,), dtype)
  return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def cache_key(source: Source, tok: Tokenizer) -> str:
  """What the cache directory is named by: spec, split, tokenizer (not file stats)."""
  ident = json.dumps([FORMAT_VERSION, source.spec, source.split, source.val_percent,
                      source.text_field, tok.hash])
  return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, source: Source, tok: Tokenizer) -> str:
  return os.path.join(cache_dir, f"{source.name}-{source.split}-{cache_key(source, tok)}")


def build_or_load(source: Source, tok: Tokenizer, cache_dir: str,
                  progress: bool = True) -> TokenCache:
  """Reuse the cache for (source, tokenizer) if valid and current, else (re)build it."""
  path = cache_path(cache_dir, source, tok)
  expect = {"key": cache_key(source, tok), "tokenizer_hash": tok.hash,
            "sources": source.fingerprint()}
  if os.path.exists(path):
    try:
      return TokenCache.open(path, expect)
    except errors.CacheError as e:
      print(f"rebuilding token cache: {e}", file=sys.stderr)
  return build(source, tok, path, progress=progress, fingerprint=expect["sources"])


def build(source: Source, tok: Tokenizer, path: str, progress: bool = True, *,
          fingerprint: list | None = None) -> TokenCache:
  """Tokenize `source` into a new cache at `path` (atomically replacing any old one).
  `fingerprint`: the source's, when the caller has just taken it (it reads the files)."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  _remove_stale_temps(path)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    header = _write(source, tok, tmp, progress,
                    source.fingerprint() if fingerprint is None else fingerprint)
    _atomic_swap(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return TokenCache(path, header)


def _write(source: Source, tok: Tokenizer, out: str, progress: bool,
           fingerprint: list) -> dict:
  dtype = tok.dtype
  eod = np.array([tok.eod_id], dtype)
  n_tokens = n_docs = 0
  t0 = time.perf_counter()
  share = {"all": 1.0, "train": 1 - source.val_percent / 100,
           "val": source.val_percent / 100}[source.split]  # a progress estimate only
  bar = tqdm(total=int(share * source.text_bytes()), unit="B",
             unit_scale=True,
             desc=f"tokenizing {source.name}:{source.split}", disable=not progress,
             leave=False, file=sys.stderr)
  with open(os.path.join(out, TOKENS), "wb") as ft, open(os.path.join(out, DOCS), "wb") as fd:

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
      ft.write(np.concatenate(parts).tobytes())
      fd.write(np.asarray(starts, np.int64).tobytes())
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
    ft.flush()
    os.fsync(ft.fileno())
  bar.close()
  if n_docs == 0:
    raise errors.EmptySourceError(f"{source.spec}: no text in the {source.split!r} split")
  header = {
      "format_version": FORMAT_VERSION,
      "key": None,
      "dataset": source.spec,
      "split": source.split,
      "val_percent": source.val_percent,
      "text_field": source.text_field,
      "tokenizer_hash": tok.hash,
      "vocab_size": tok.vocab_size,
      "eod_id": tok.eod_id,
      "dtype": dtype.name,
      "num_tokens": n_tokens,
      "num_docs": n_docs,
      "sources": fingerprint,
      "build_seconds": round(time.perf_counter() - t0, 3),
  }
  header["key"] = cache_key(source, tok)
  with open(os.path.join(out, HEADER), "w", encoding="utf-8") as f:
    json.dump(header, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  return header


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
