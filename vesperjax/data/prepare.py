"""The trainer's entry point: dataset spec + tokenizer spec -> token caches + tokenizer."""
import hashlib
import json
import os
import sys
from typing import Sequence

from vesperjax.data import errors, mixture, sources
from vesperjax.data.cache import TokenCache, build_or_load
from vesperjax.data.mixture import Mixture, MixtureSource
from vesperjax.data.tokenizer import (BPE_MAX_BYTES, Tokenizer, byte_tokenizer,
                                      parse_spec, train_bpe)


def resolve_tokenizer(spec: str, dataset: str | Sequence[MixtureSource], cache_dir: str,
                      *, text_field: str = "text", val_percent: float = 5.0,
                      progress: bool = True) -> Tokenizer:
  """Load / build the tokenizer; a trained BPE is saved (and reused) in cache_dir.

  The BPE is trained on the training split only, so validation text never leaks in;
  for a mixture (`dataset` a sequence of `MixtureSource`), on a sample of every
  source's training split in proportion to the weights (`mixture.sample_texts`).
  Its file name hashes the dataset(s), their file stats and weights: changed data
  retrains it.
  """
  kind, vocab = parse_spec(spec)
  if kind == "byte":
    tok = byte_tokenizer()
  elif kind == "file":
    tok = Tokenizer.from_file(os.path.expanduser(spec))
  else:
    kw = dict(text_field=text_field, val_percent=val_percent)
    if isinstance(dataset, str):
      src = sources.open_source(dataset, "train", **kw)
      ident = [src.spec, src.fingerprint(), vocab, val_percent, text_field,
               BPE_MAX_BYTES]
      name, what = src.name, f"{src.name}:train"
      texts = (text for text, _ in src.pieces())
    else:
      srcs = [sources.open_source(m.dataset, "train", **kw) for m in dataset]
      parts = [[m.name, s.spec, s.fingerprint(), m.weight]
               for m, s in zip(dataset, srcs)]
      ident = [parts, vocab, val_percent, text_field, BPE_MAX_BYTES]
      name = "mix-" + "-".join(m.name for m in dataset)
      what = "a weighted sample of " + ", ".join(f"{m.name}:train" for m in dataset)
      texts = mixture.sample_texts([(t for t, _ in s.pieces()) for s in srcs],
                                   [m.weight for m in dataset], BPE_MAX_BYTES)
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tokenizer-bpe{vocab}-{name}-{key}.json")
    if os.path.isfile(path):
      try:
        tok = Tokenizer.from_file(path)
        tok.path = path
        return tok
      except errors.TokenizerError as e:
        print(f"retraining tokenizer: {e}", file=sys.stderr)
    if progress:
      print(f"training byte-level BPE (vocab {vocab}) on {what} "
            f"(first {BPE_MAX_BYTES >> 20} MB)", file=sys.stderr)
    # bounded pieces, not whole documents: one huge line must not be held whole
    tok = train_bpe(texts, vocab)  # its bars print to stdout
    tok.save(path)
    tok.path = path
    return tok
  tok.path = None
  return tok


def prepare_dataset(dataset: str, tokenizer: str, cache_dir: str, split: str | None = None,
                    *, text_field: str = "text", val_percent: float = 5.0,
                    progress: bool = True) -> tuple[TokenCache, Tokenizer]:
  """Token cache of one split of `dataset` (built once, then reused) and its tokenizer.

  dataset: a .txt/.jsonl/.json file, a folder, or `stdlib`, optionally with `:train`,
  `:val` or `:all` (the `split` argument wins). tokenizer: a tokenizer.json path,
  `bpe:N` or `byte`. Raises a `DataError` subclass on bad input.
  """
  cache_dir = os.path.expanduser(cache_dir)
  base, split = sources.parse_split(str(dataset), split)
  tok = resolve_tokenizer(tokenizer, base, cache_dir, text_field=text_field,
                          val_percent=val_percent, progress=progress)
  src = sources.open_source(base, split, text_field=text_field, val_percent=val_percent)
  return build_or_load(src, tok, cache_dir, progress=progress), tok


def prepare_train_val(dataset: str, tokenizer: str, cache_dir: str, *,
                      val_dataset: str | None = None, text_field: str = "text",
                      val_percent: float = 5.0, progress: bool = True
                      ) -> tuple[TokenCache, TokenCache | None, Tokenizer]:
  """(train cache, validation cache or None if that split is empty, tokenizer).

  Without `val_dataset`, both come from `dataset` by the hash split; with it, all of
  `dataset` trains and all of `val_dataset` validates.
  """
  train_split = "all" if val_dataset else "train"
  kw = dict(text_field=text_field, val_percent=val_percent, progress=progress)
  train, tok = prepare_dataset(dataset, tokenizer, cache_dir, train_split, **kw)
  spec = tok.path or tokenizer  # reuse the BPE just trained on the training data
  try:
    if val_dataset:
      val, _ = prepare_dataset(val_dataset, spec, cache_dir, "all", **kw)
    else:
      val, _ = prepare_dataset(dataset, spec, cache_dir, "val", **kw)
  except errors.EmptySourceError as e:
    print(f"warning: no validation data ({e})", file=sys.stderr)
    val = None
  return train, val, tok


def prepare_mixture(mix: Sequence[MixtureSource], tokenizer: str, cache_dir: str, *,
                    val_dataset: str | None = None, text_field: str = "text",
                    val_percent: float = 5.0, progress: bool = True
                    ) -> tuple[Mixture, Mixture | TokenCache | None, Tokenizer]:
  """(training mixture, validation data or None, tokenizer) of a parsed mixture spec.

  One tokenizer for every source (a BPE trained on a weighted sample of all of them);
  each source tokenized into its own cache. Validation: with `val_dataset`, all of every
  source trains and `val_dataset` validates; without it, each source's held-out split
  validates, mixed with the same weights (a source with no held-out text is left out,
  with a warning; None when none has any).
  """
  cache_dir = os.path.expanduser(cache_dir)
  kw = dict(text_field=text_field, val_percent=val_percent)
  tok = resolve_tokenizer(tokenizer, mix, cache_dir, progress=progress, **kw)
  train_split = "all" if val_dataset else "train"
  names, weights = tuple(m.name for m in mix), tuple(m.weight for m in mix)
  train = tuple(build_or_load(sources.open_source(m.dataset, train_split, **kw), tok,
                              cache_dir, progress=progress) for m in mix)
  if val_dataset:
    spec = tok.path or tokenizer  # the BPE just trained on the mixture
    try:
      val, _ = prepare_dataset(val_dataset, spec, cache_dir, "all", progress=progress,
                               **kw)
    except errors.EmptySourceError as e:
      print(f"warning: no validation data ({e})", file=sys.stderr)
      val = None
    return Mixture(names, train, weights), val, tok
  held_out = []
  for m in mix:
    try:
      held_out.append((m, build_or_load(sources.open_source(m.dataset, "val", **kw), tok,
                                        cache_dir, progress=progress)))
    except errors.EmptySourceError as e:
      print(f"warning: {m.name} has no validation data ({e})", file=sys.stderr)
  val = (Mixture(tuple(m.name for m, _ in held_out), tuple(c for _, c in held_out),
                 tuple(m.weight for m, _ in held_out)) if held_out else None)
  return Mixture(names, train, weights), val, tok
