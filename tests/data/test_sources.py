"""Sources: formats, splits, streaming, bad input."""
import json
import os
import shutil

import pytest

from vesperjax.data import errors, sources


def docs(path, split="all", **kw):
  return list(sources.open_source(str(path), split, **kw).documents())


def test_txt_blank_line_documents(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("\n\nfirst doc\nstill first\n\n \n  second\n\nthird")
  assert docs(p) == ["first doc\nstill first", "  second", "third"]


def test_txt_long_document_streams_in_pieces(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "READ_BYTES", 16)
  text = "".join(f"line {i}\n" for i in range(200))
  (tmp_path / "a.txt").write_text(text + "\n\nnext")
  src = sources.open_source(str(tmp_path / "a.txt"), "all")
  pieces = list(src.pieces())
  assert len(pieces) > 10 and all(len(t) < 64 for t, _ in pieces[:-2])
  assert [t for t, _ in pieces if _] [-1] == "next"
  assert list(src.documents()) == [text.rstrip("\n"), "next"]


def test_jsonl_field_and_skips(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"text": "a"}\n\n{"text": ""}\n{"body": "x", "text": "b"}\n')
  assert docs(p) == ["a", "b"]
  q = tmp_path / "e.jsonl"
  q.write_text('{"body": "x"}\n')
  assert docs(q, text_field="body") == ["x"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text('{"text": "a"}\n{"text": oops}\n')
  with pytest.raises(errors.MalformedRecordError, match=r"d\.jsonl:2: invalid JSON"):
    docs(p)
  p.write_text('{"text": "a"}\n{"other": 1}\n')
  with pytest.raises(errors.MalformedRecordError, match=r"d\.jsonl:2:.*'text'"):
    docs(p)


def test_squad(tmp_path):
  p = tmp_path / "s.json"
  p.write_text(json.dumps({"data": [{"title": "Big_Cats", "paragraphs": [
      {"context": "Lions roar.", "qas": [
          {"question": "What roars?", "answers": [{"text": "Lions"}]},
          {"question": "Do fish roar?", "answers": [], "is_impossible": True}]}]}]}))
  assert docs(p) == ["Big Cats\n\nLions roar.\n\nQ: What roars?\nA: Lions\n"
                     "Q: Do fish roar?\nA: (no answer)\n"]


def test_squad_without_data(tmp_path):
  p = tmp_path / "s.json"
  p.write_text('{"version": 2}')
  with pytest.raises(errors.MalformedRecordError, match=r"s\.json.*'data'"):
    docs(p)


def test_folder_recursive_sorted(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "z.txt").write_text("z")
  (tmp_path / "a.txt").write_text("a")
  (tmp_path / "b" / "c.jsonl").write_text('{"text": "c"}\n')
  (tmp_path / ".hidden.txt").write_text("hidden")
  (tmp_path / "skip.bin").write_bytes(b"\0\1")
  (tmp_path / "empty.txt").write_text("")
  src = sources.open_source(str(tmp_path), "all")
  assert [f.rel for f in src.files] == ["a.txt", "b/c.jsonl", "b/z.txt", "empty.txt"]
  assert list(src.documents()) == ["a", "c", "z"]


@pytest.mark.parametrize("content,err,match", [
    (b"", errors.EmptySourceError, "empty"),
    (b"hello\0world", errors.DecodeError, "binary"),
    (b"caf\xe9 latin-1", errors.DecodeError, "UTF-8"),
])
def test_bad_txt(tmp_path, content, err, match):
  p = tmp_path / "bad.txt"
  p.write_bytes(content)
  with pytest.raises(err, match=match) as e:
    docs(p)
  assert "bad.txt" in str(e.value) and "\n" not in str(e.value)


def test_missing_path(tmp_path):
  with pytest.raises(errors.MissingPathError, match="nope"):
    sources.open_source(str(tmp_path / "nope.txt"))
  with pytest.raises(errors.EmptySourceError):
    sources.open_source(str(tmp_path))  # a folder with no data files


def test_split_deterministic_and_disjoint(tmp_path):
  (tmp_path / "d.jsonl").write_text("".join(
      json.dumps({"text": f"doc {i}"}) + "\n" for i in range(400)))
  p = str(tmp_path / "d.jsonl")
  train, val, all_ = docs(p, "train"), docs(p, "val"), docs(p, "all")
  assert sorted(train + val) == sorted(all_) and not set(train) & set(val)
  assert 5 <= len(val) <= 40  # ~5 %
  assert list(sources.open_source(p + ":val").documents()) == val


def test_stdlib_split(monkeypatch):
  root = os.path.join(sources.stdlib_root(), "json")
  monkeypatch.setattr(sources, "stdlib_root", lambda: root)
  tr = sources.open_source("stdlib")
  assert tr.split == "train" and all(f.rel.endswith(".py") for f in tr.files)
  va = sources.open_source("stdlib:val")
  al = sources.open_source("stdlib", "all")
  assert len(list(tr.documents())) + len(list(va.documents())) == len(list(al.documents()))
  full = sources._stdlib_files(sources.sysconfig.get_paths()["stdlib"])
  assert not any("/test/" in f"/{f.rel}" or "site-packages" in f.rel for f in full)


def test_stdlib_docs_is_the_docstrings_and_the_reference_topics(monkeypatch, tmp_path):
  """stdlib-docs: one document of docstrings per module (checked against the imported
  module's own __doc__, cleaned as inspect does) and one per pydoc topic."""
  import inspect
  import json as json_module
  import pydoc_data.topics
  root = os.path.join(sources.stdlib_root(), "json")
  monkeypatch.setattr(sources, "stdlib_root", lambda: root)
  every = list(sources.open_source("stdlib-docs", "all").documents())
  init = next(d for d in every if d.startswith(inspect.cleandoc(json_module.__doc__)))
  assert inspect.cleandoc(json_module.dumps.__doc__) in init
  assert "def dumps(" not in init and "import codecs" not in init  # not the code
  tr = list(sources.open_source("stdlib-docs").documents())
  va = list(sources.open_source("stdlib-docs:val").documents())
  assert sorted(tr + va) == sorted(every)
  (tmp_path / "pydoc_data").mkdir()  # a stdlib holding only the topics
  shutil.copy(pydoc_data.topics.__file__, tmp_path / "pydoc_data" / "topics.py")
  monkeypatch.setattr(sources, "stdlib_root", lambda: str(tmp_path))
  topics = list(sources.open_source("stdlib-docs", "all").documents())
  assert len(topics) == sum(1 for t in pydoc_data.topics.topics.values() if t.strip())
  assert pydoc_data.topics.topics["assert"].strip() in topics


def test_one_huge_line_is_cut_without_changing_its_tokens(tmp_path, monkeypatch):
  """A document with no line ends reaches the tokenizer in bounded pieces, cut where the
  byte-level pre-tokenizer would split anyway, so the tokens are those of the whole."""
  import random
  from vesperjax.data.tokenizer import train_bpe
  monkeypatch.setattr(sources, "PIECE_CHARS", 300)
  rng = random.Random(0)
  words = ["alpha", "beta,", "gamma.", "(delta)", "x", "42", "éàü"]
  text = " ".join(rng.choice(words) for _ in range(2000)) + "  tail  end"
  path = tmp_path / "one.txt"
  path.write_text(text)
  pieces = list(sources.open_source(str(path), "all").pieces())
  assert len(pieces) > 10 and max(len(t) for t, _ in pieces) <= 300
  assert "".join(t for t, _ in pieces) == text
  assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
  tok = train_bpe(iter([text]), 300)
  assert sum((tok.encode(t) for t, _ in pieces), []) == tok.encode(text)
