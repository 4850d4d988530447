"""Text sources: stream documents from .txt / .jsonl / SQuAD .json / Parquet / Arrow
files, folders, globs, lists of those, and stdlib.

Everything streams `(text, ends_document)` pieces so a file larger than RAM never has
to be held whole: a long document may arrive as several pieces, only the last of which
has `ends_document=True` (the cache writes the end-of-document token after it).

Formats (see docs/data.md):
  .txt    documents are separated by blank lines (a line holding only whitespace).
          A file with no blank lines is one document, streamed in ~4 MB pieces cut at
          line ends. Any file with an unknown suffix given explicitly reads as .txt.
  .jsonl  one JSON object per line; the document is its `text_field` (default "text").
  .json   SQuAD: every paragraph becomes one document: title, context, then
          "Q: ... / A: ..." lines for its questions.
  .parquet / .arrow
          one document per non-null, non-empty row of the `text_field` column, read a
          row group (record batch) at a time (vesperjax/data/columnar.py).
  folder  every .txt/.jsonl/.json/.parquet/.arrow file below it (recursive, sorted by
          relative path; hidden files and folders skipped). A Hugging Face
          `save_to_disk` folder (a `state.json`) contributes the Arrow files it lists.
  glob    `/data/fineweb/*.parquet` (`**` recurses): the matching files and folders,
          keyed relative to the folder the pattern starts in.
  list    entries separated by commas (`a.parquet,b/,c/*.jsonl`); each is keyed as if it
          were the whole spec. A string that names an existing path is never split.
  stdlib  the .py files of the running interpreter's standard library (tests,
          site-packages and caches excluded), one document per file.
  stdlib-docs
          prose from the same files: each file's docstrings (one document) and the
          language reference topics of pydoc_data (vesperjax/data/prose.py).

Splits: each unit (a .txt document, a JSONL line, a SQuAD paragraph, a Parquet / Arrow
row, a stdlib file) goes to "val" when a hash of its key (relative path + index; a
Parquet / Arrow row's index in its file) falls below `val_percent` (default 5 %), else to
"train"; "all" keeps everything. So the split is deterministic, independent of file
order, and stable when other files are added.
"""
import codecs
import dataclasses
import glob
import hashlib
import json
import os
import re
import sysconfig
from typing import Iterator

from vesperjax.data import columnar, errors, prose

Piece = tuple[str, bool]

SPLITS = ("train", "val", "all")
SUFFIXES = (".txt", ".jsonl", ".json", *columnar.SUFFIX_KINDS)
_GLOB_MAGIC = re.compile(r"[*?[]")
READ_BYTES = 4 << 20  # read/emit granularity for .txt; tests shrink it
# The content part of a file's fingerprint: files up to SAMPLE_WHOLE bytes are hashed
# whole, larger ones by SAMPLE_BLOCKS evenly spaced blocks (first and last included), so
# checking a multi-GB corpus reads about SAMPLE_BLOCKS * SAMPLE_BLOCK bytes a file.
SAMPLE_WHOLE = 1 << 20
SAMPLE_BLOCKS, SAMPLE_BLOCK = 16, 16 << 10
# Longest piece handed to the tokenizer: its memory grows with the piece, so one huge
# line (or JSON record) is cut, at a line end or before a word where it can be.
PIECE_CHARS = 1 << 20
_BLANK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_WORD_START = re.compile(r"\S \S")  # a single space between two non-spaces
EMBEDDED = {"stdlib": "py", "stdlib-docs": "pydoc"}  # corpora every machine has: kind
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                "__pycache__", "__phello__"}


def stdlib_root() -> str:
  """Root of the embedded corpus; a function so tests can point it at a subset."""
  return sysconfig.get_paths()["stdlib"]


def in_split(key: str, split: str, val_percent: float) -> bool:
  if split == "all":
    return True
  h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
  return ((h % 10000) < val_percent * 100) == (split == "val")


@dataclasses.dataclass(frozen=True)
class File:
  path: str  # absolute
  rel: str  # relative to the dataset root, '/'-separated: the split/hash key
  kind: str  # "txt" | "jsonl" | "squad" | "py" | "parquet" | "arrow"


@dataclasses.dataclass
class Source:
  """A resolved dataset spec: its files and how to stream one split of them."""
  spec: str  # canonical: "stdlib", an absolute path or pattern, or those joined by ","
  name: str  # short, for cache directory names
  files: list[File]
  split: str = "train"
  val_percent: float = 5.0
  text_field: str = "text"
  explicit_file: bool = False  # a single file named on the command line

  def fingerprint(self) -> list[list]:
    """[path, size, mtime_ns, content digest] per file: what the cache compares to detect
    changes (the digest catches an edit that keeps the size and the old mtime)."""
    out = []
    for f in self.files:
      try:
        st = os.stat(f.path)
        out.append([f.rel, st.st_size, st.st_mtime_ns, content_digest(f.path, st.st_size)])
      except OSError as e:
        raise errors.MissingPathError(f"{f.path}: {e.strerror}") from None
    return out

  def total_bytes(self) -> int:
    return sum(os.path.getsize(f.path) for f in self.files)

  def text_bytes(self) -> int:
    """About how many bytes of text the files hold (a compressed Parquet file holds more
    than its size): what a progress bar counts towards."""
    return sum(columnar.text_bytes(f.path, f.kind, self.text_field)
               if f.kind in columnar.KINDS else os.path.getsize(f.path)
               for f in self.files)

  def pieces(self) -> Iterator[Piece]:
    """Stream the split's (text, ends_document) pieces, file by file, in order; no piece
    is longer than PIECE_CHARS. Parquet and Arrow files are all checked (metadata,
    column) before the first piece, so a bad shard fails before any work."""
    for f in self.files:
      if f.kind in columnar.KINDS:
        columnar.check(f.path, f.kind, self.text_field)
    for text, end in self._whole_pieces():
      while len(text) > PIECE_CHARS:
        cut = _cut_point(text, PIECE_CHARS)
        yield text[:cut], False
        text = text[cut:]
      yield text, end

  def _whole_pieces(self) -> Iterator[Piece]:
    for f in self.files:
      if f.kind == "py":
        yield from self._stdlib_file(f)
        continue
      if f.kind == "pydoc":
        for key, text in prose.documents(f.path, f.rel):
          if in_split(key, self.split, self.val_percent):
            yield text, True
        continue
      if f.kind in columnar.KINDS:
        for row, text in columnar.rows(f.path, f.kind, self.text_field):
          if in_split(f"{f.rel}#{row}", self.split, self.val_percent):
            yield text, True
        continue
      if os.path.getsize(f.path) == 0:
        if self.explicit_file:
          raise errors.EmptySourceError(f"{f.path}: file is empty")
        continue
      reader = {"txt": _txt_pieces, "jsonl": self._jsonl_pieces, "squad": _squad_pieces}
      index, keep = 0, None
      for text, end in reader[f.kind](f):
        if keep is None:  # first piece of a document decides its split
          keep = in_split(f"{f.rel}#{index}", self.split, self.val_percent)
        if keep:
          yield text, end
        if end:
          index, keep = index + 1, None

  def documents(self) -> Iterator[str]:
    """Whole documents (joins pieces): for small data and tests."""
    parts = []
    for text, end in self.pieces():
      parts.append(text)
      if end:
        yield "".join(parts)
        parts = []

  def _stdlib_file(self, f: File) -> Iterator[Piece]:
    if not in_split(f.rel, self.split, self.val_percent):
      return
    try:
      with open(f.path, encoding="utf-8") as fh:
        text = fh.read()
    except (UnicodeDecodeError, OSError):
      return  # not user data: skip the odd file rather than fail
    if text.strip():
      yield text, True

  def _jsonl_pieces(self, f: File) -> Iterator[Piece]:
    with open(f.path, "rb") as fh:
      for lineno, raw in enumerate(fh, 1):
        if not raw.strip():
          continue
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError:
          raise errors.DecodeError(
              f"{f.path}:{lineno}: not valid UTF-8 (binary file?)") from None
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise errors.MalformedRecordError(
              f"{f.path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or self.text_field not in rec:
          raise errors.MalformedRecordError(
              f"{f.path}:{lineno}: expected an object with a {self.text_field!r} field")
        text = rec[self.text_field]
        if not isinstance(text, str):
          raise errors.MalformedRecordError(
              f"{f.path}:{lineno}: field {self.text_field!r} is not a string")
        if text:
          yield text, True


def _cut_point(text: str, limit: int) -> int:
  """Where to cut `text` at or before `limit` without changing how it tokenizes: after a
  newline, else before a space that starts a word (the byte-level pre-tokenizer puts a
  word's leading space in the word), else at `limit` (no whitespace at all)."""
  newline = text.rfind("\n", 0, limit) + 1
  if newline > limit // 2:
    return newline
  words = list(_WORD_START.finditer(text, max(limit // 2, limit - 4096), limit + 1))
  if words:
    return words[-1].start() + 1
  return newline or limit


def content_digest(path: str, size: int) -> str:
  """blake2b of the whole file up to SAMPLE_WHOLE bytes, else of SAMPLE_BLOCKS blocks of
  SAMPLE_BLOCK bytes spread evenly from its start to its end."""
  h = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as fh:
    if size <= SAMPLE_WHOLE:
      h.update(fh.read())
    else:
      last = size - SAMPLE_BLOCK
      for i in range(SAMPLE_BLOCKS):
        fh.seek(last * i // (SAMPLE_BLOCKS - 1))
        h.update(fh.read(SAMPLE_BLOCK))
  return h.hexdigest()


def _decoded_chunks(path: str) -> Iterator[str]:
  """UTF-8 text of a file in READ_BYTES chunks; binary / bad UTF-8 raise DecodeError."""
  dec = codecs.getincrementaldecoder("utf-8")("strict")
  offset = 0
  with open(path, "rb") as fh:
    while True:
      raw = fh.read(READ_BYTES)
      if b"\0" in raw:
        raise errors.DecodeError(
            f"{path}: binary file (NUL byte near offset {offset + raw.index(0)})")
      try:
        text = dec.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        raise errors.DecodeError(
            f"{path}: not valid UTF-8 (byte offset {offset + e.start})") from None
      offset += len(raw)
      if text:
        yield text
      if not raw:
        return


def _txt_pieces(f: File) -> Iterator[Piece]:
  """Blank-line separated documents; a long one is flushed in pieces at line ends."""
  buf, pending = "", False  # pending: part of the current document already emitted
  for chunk in [*_decoded_chunks(f.path), None]:
    s = buf if chunk is None else buf + chunk
    # A separator running into the buffer's trailing blanks may continue in the next
    # chunk: leave it (and what follows) in the buffer until more text arrives.
    limit = len(s) if chunk is None else len(s.rstrip(" \t\r\f\v"))
    pos = 0
    for m in _BLANK.finditer(s):
      if m.end() >= limit:
        break
      if pending or s[pos:m.start()].strip():
        yield s[pos:m.start()], True
      pos, pending = m.end(), False
    buf = s[pos:]
    if chunk is not None and len(buf) > READ_BYTES:
      # Cut at the last line end before any trailing whitespace (a possible
      # separator split across chunks).
      m = len(buf.rstrip())
      cut = buf.rfind("\n", 0, m) + 1 or m
      if cut:
        yield buf[:cut], False
        buf, pending = buf[cut:], True
  if pending or buf.strip():
    yield buf, True


def _squad_pieces(f: File) -> Iterator[Piece]:
  try:
    with open(f.path, "rb") as fh:
      raw = fh.read()
    if b"\0" in raw:
      raise errors.DecodeError(f"{f.path}: binary file (NUL byte)")
    data = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError:
    raise errors.DecodeError(f"{f.path}: not valid UTF-8 (binary file?)") from None
  except json.JSONDecodeError as e:
    raise errors.MalformedRecordError(
        f"{f.path}:{e.lineno}: invalid JSON ({e.msg})") from None
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise errors.MalformedRecordError(
        f"{f.path}: not a SQuAD file (expected a top-level 'data' list)")
  for i, article in enumerate(data["data"]):
    if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
      raise errors.MalformedRecordError(
          f"{f.path}: data[{i}] has no 'paragraphs' list (not SQuAD format)")
    title = str(article.get("title", "")).replace("_", " ").strip()
    for j, para in enumerate(article["paragraphs"]):
      if not isinstance(para, dict) or not isinstance(para.get("context"), str):
        raise errors.MalformedRecordError(
            f"{f.path}: data[{i}].paragraphs[{j}] has no 'context' string")
      yield squad_text(title, para), True


def squad_text(title: str, para: dict) -> str:
  """One paragraph as training text: title, context, then its Q/A pairs."""
  lines = [title, ""] if title else []
  lines += [para["context"].strip(), ""]
  for qa in para.get("qas") or []:
    if not isinstance(qa, dict) or "question" not in qa:
      continue
    answers = [a.get("text", "") for a in qa.get("answers") or [] if isinstance(a, dict)]
    answer = answers[0] if answers and not qa.get("is_impossible") else "(no answer)"
    lines += [f"Q: {str(qa['question']).strip()}", f"A: {answer.strip()}"]
  return "\n".join(lines).rstrip() + "\n"


def _kind(path: str) -> str:
  ext = os.path.splitext(path)[1].lower()
  return {".jsonl": "jsonl", ".json": "squad", **columnar.SUFFIX_KINDS}.get(ext, "txt")


def _stdlib_files(root: str, kind: str = "py") -> list[File]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in _STDLIB_SKIP and not d.startswith("."))
    for name in sorted(filenames):
      if name.endswith(".py") and not name.startswith("."):
        path = os.path.join(dirpath, name)
        out.append(File(path, os.path.relpath(path, root).replace(os.sep, "/"), kind))
  return sorted(out, key=lambda f: f.rel)


def parse_split(spec: str, split: str | None) -> tuple[str, str]:
  """`stdlib:val` / `data.txt:train` carry the split in the spec; an argument wins."""
  base, sep, tail = spec.rpartition(":")
  if sep and tail in SPLITS and (base in EMBEDDED or not os.path.exists(spec)):
    return base, split or tail
  return spec, split or "train"


def dataset_entries(spec: str) -> list[str]:
  """The entries of a dataset spec: the spec itself when it names an existing path (or
  has no comma), else its comma-separated parts."""
  if "," not in spec or os.path.exists(os.path.expanduser(spec)):
    return [spec]
  entries = [e.strip() for e in spec.split(",")]
  if not all(entries):
    raise errors.DataError(f"{spec}: empty entry in a comma-separated dataset list")
  return entries


def open_source(spec: str | list[str] | tuple[str, ...], split: str | None = None, *,
                text_field: str = "text", val_percent: float = 5.0) -> Source:
  """Resolve a dataset spec: a path, folder, glob, `stdlib`, or a list of those (a list
  or a comma-separated string), optionally followed by `:train`/`:val`/`:all`."""
  spec = ",".join(map(str, spec)) if isinstance(spec, (list, tuple)) else str(spec)
  spec, split = parse_split(spec, split)
  if split not in SPLITS:
    raise errors.DataError(f"unknown split {split!r} (expected one of {SPLITS})")
  kw = dict(split=split, val_percent=val_percent, text_field=text_field)
  resolved = [_resolve_entry(entry) for entry in dataset_entries(spec)]
  if len(resolved) == 1:
    canonical, name, files = resolved[0]
    explicit = len(files) == 1 and os.path.isfile(canonical)
    return Source(canonical, name, files, explicit_file=explicit, **kw)
  files, seen = [], set()
  for _, _, entry_files in resolved:
    for f in entry_files:
      if f.path not in seen:  # a file named twice (overlapping globs) is read once
        seen.add(f.path)
        files.append(f)
  name = f"{resolved[0][1]}+{len(resolved) - 1}"
  return Source(",".join(c for c, _, _ in resolved), name, files, **kw)


def _resolve_entry(entry: str) -> tuple[str, str, list[File]]:
  """(canonical spec, short name, files) of one entry: stdlib, a glob, a file, a folder."""
  if entry in EMBEDDED:
    root = stdlib_root()
    files = _stdlib_files(root, EMBEDDED[entry])
    if not files:
      raise errors.EmptySourceError(f"{root}: no standard-library .py files found")
    return entry, entry, files
  expanded = os.path.expanduser(entry)
  if _GLOB_MAGIC.search(expanded) and not os.path.exists(expanded):
    return _resolve_glob(entry, os.path.abspath(expanded))
  path = os.path.realpath(expanded)
  if not os.path.exists(path):
    raise errors.MissingPathError(f"{entry}: no such file or directory")
  name = os.path.splitext(os.path.basename(path.rstrip("/")))[0] or "data"
  if os.path.isfile(path):
    return path, name, [File(path, os.path.basename(path), _kind(path))]
  files = _folder_files(path, path)
  if not files:
    raise errors.EmptySourceError(
        f"{entry}: no .txt/.jsonl/.json/.parquet/.arrow files in this folder")
  return path, name, files


def _resolve_glob(entry: str, pattern: str) -> tuple[str, str, list[File]]:
  """A glob's matches, keyed relative to the folder its pattern starts in (so
  `d/*.parquet` splits exactly like the folder `d`)."""
  parts = pattern.split(os.sep)
  magic = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
  base = os.path.realpath(os.sep.join(parts[:magic]) or os.sep)
  pattern = os.path.join(base, *parts[magic:])
  files = []
  for match in sorted(glob.glob(pattern, recursive=True)):
    path = os.path.realpath(match)
    if os.path.isdir(path):
      files += _folder_files(path, base)
    elif os.path.isfile(path):
      files.append(File(path, os.path.relpath(path, base).replace(os.sep, "/"),
                        _kind(path)))
  if not files:
    raise errors.EmptySourceError(f"{entry}: no files match this pattern")
  name = os.path.basename(base.rstrip(os.sep)) or "data"
  return pattern, name, sorted(files, key=lambda f: f.rel)


def _folder_files(root: str, rel_base: str) -> list[File]:
  """The dataset files below `root`, sorted, keyed relative to `rel_base`."""
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    listed = columnar.saved_dataset_files(dirpath, filenames)
    if listed is not None:
      filenames = listed  # a save_to_disk folder: its Arrow files, not its metadata
    for fn in filenames:
      if (fn.startswith(".") or fn == columnar.HF_DATASET_DICT
          or os.path.splitext(fn)[1].lower() not in SUFFIXES):
        continue
      p = os.path.join(dirpath, fn)
      files.append(File(p, os.path.relpath(p, rel_base).replace(os.sep, "/"), _kind(p)))
  return sorted(files, key=lambda f: f.rel)
