"""Tokenizers from spec strings, all HF `tokenizers` underneath (one hashable JSON file).

Specs:
  path/to/tokenizer.json  load it (an end-of-document token is added if it has none)
  bpe:N                   train a byte-level BPE with vocab N on the training split
                          (first `BPE_MAX_BYTES` of text, for speed), saved as JSON
  byte                    256 byte tokens + the end-of-document token (vocab 257)

Every tokenizer has the end-of-document token `EOD` ("<|endoftext|>"); text that
happens to contain that string is encoded as plain text, never as the special token.
"""
import hashlib
import json
import os
from typing import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from vesperjax.data import errors

EOD = "<|endoftext|>"
_EOD_ALIASES = (EOD, "</s>", "<eos>", "<|eos|>", "[SEP]")
BPE_MAX_BYTES = 32 << 20  # enough text for a stable BPE, little enough to train quickly


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """Model vocab: the tokenizer's, padded up to a multiple (fast matmuls, sharding).

  Padding rows are never targets; the trainer masks their logits to -inf so they get
  no probability mass.
  """
  return -(-n // multiple) * multiple


class Tokenizer:
  """Thin wrapper over `tokenizers.Tokenizer` with the bits the trainer needs."""

  def __init__(self, tok: tokenizers.Tokenizer, eod: str | None = None):
    eod = eod or next((t for t in _EOD_ALIASES if tok.token_to_id(t) is not None), None)
    if eod is None:
      tok.add_special_tokens([EOD])
      eod = EOD
    tok.encode_special_tokens = True  # "<|endoftext|>" in data stays plain text
    self._tok = tok
    self.eod_token = eod
    self.eod_id = tok.token_to_id(eod)
    self._json = tok.to_str()
    self.hash = hashlib.sha256(self._json.encode()).hexdigest()[:16]

  @property
  def content_hash(self) -> str:
    """What the ids mean, hashed in a normal form: the model section (vocabulary,
    merges, its options) and the added tokens as sorted-key JSON, merges as pairs
    (older `tokenizers` save "a b" strings), so two swapped ids change it while the
    JSON's layout does not. What a checkpoint's embedding rows depend on."""
    spec = json.loads(self._json)
    model = dict(spec.get("model") or {})
    if isinstance(model.get("merges"), list):
      model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m)
                         for m in model["merges"]]
    added = sorted(spec.get("added_tokens") or [], key=lambda t: t.get("id", -1))
    text = json.dumps({"model": model, "added_tokens": added}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def dtype(self) -> np.dtype:
    """Smallest unsigned dtype that holds every id (what the token cache stores)."""
    return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Multi-threaded in Rust (TOKENIZERS_PARALLELISM / RAYON_NUM_THREADS)."""
    return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def save(self, path: str) -> None:
    """Atomic write of tokenizer.json (temp file + rename); a full disk removes the
    temp file and raises DiskFullError naming `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
      with open(tmp, "w", encoding="utf-8") as f:
        f.write(self._json)
      os.replace(tmp, path)
    except OSError as e:
      if os.path.exists(tmp):
        os.remove(tmp)
      full = errors.disk_full(e, path, "saving the tokenizer")
      if full is not None:
        raise full from None
      raise

  @classmethod
  def from_file(cls, path: str) -> "Tokenizer":
    if not os.path.isfile(path):
      raise errors.MissingPathError(f"{path}: tokenizer file not found")
    try:
      return cls(tokenizers.Tokenizer.from_file(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise errors.TokenizerError(f"{path}: not a valid tokenizer.json ({msg})") from None

  def __repr__(self):
    return f"Tokenizer(vocab_size={self.vocab_size}, eod_id={self.eod_id}, hash={self.hash})"


def byte_tokenizer() -> Tokenizer:
  """256 byte tokens (ids 0..255 = byte values) + EOD (id 256)."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
  tok = tokenizers.Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([EOD])
  return Tokenizer(tok, EOD)


def _byte_of(ch: str) -> int:
  """Inverse of the GPT-2 bytes->unicode map, so id == byte value."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(
      range(0xAE, 0xFF + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(map(chr, cs), bs))[ch]


def train_bpe(texts: Iterator[str], vocab_size: int, max_bytes: int = BPE_MAX_BYTES,
              show_progress: bool = False) -> Tokenizer:
  """Byte-level BPE (GPT-2 style pre-tokenisation), EOD is id 0."""
  if vocab_size < 257 + 1:
    raise errors.TokenizerError(f"bpe:{vocab_size}: vocab must be > 257 (bytes + EOD)")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOD], show_progress=show_progress,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)

  def capped():
    seen = 0
    for t in texts:
      yield t
      seen += len(t)
      if seen >= max_bytes:
        return

  tok.train_from_iterator(capped(), trainer=trainer)
  return Tokenizer(tok, EOD)


def parse_spec(spec: str) -> tuple[str, int | None]:
  """-> ("file", None) | ("bpe", vocab) | ("byte", None); raises TokenizerError."""
  spec = str(spec)
  if spec == "byte":
    return "byte", None
  if spec.startswith("bpe:"):
    try:
      n = int(spec[4:])
    except ValueError:
      raise errors.TokenizerError(f"{spec}: expected bpe:VOCAB_SIZE, e.g. bpe:8192") from None
    if n <= 257:
      raise errors.TokenizerError(f"{spec}: vocab must be > 257 (bytes + EOD)")
    return "bpe", n
  if spec.endswith(".json") or os.path.sep in spec or os.path.exists(spec):
    return "file", None
  raise errors.TokenizerError(
      f"unknown tokenizer spec {spec!r} (expected a tokenizer.json path, bpe:N or byte)")
