"""Token cache: contents, reuse, rebuild on change/corruption, atomicity, chunking."""
import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from vesperjax.data import cache as cache_lib
from vesperjax.data import errors, prepare_dataset, prepare_train_val, sources
from vesperjax.data.cache import TokenCache
from vesperjax.data.tokenizer import byte_tokenizer


def write_docs(path, n=40):
  docs = [f"document number {i}\n" + "word " * (i % 7) for i in range(n)]
  path.write_text("\n\n".join(docs))
  return [d.rstrip("\n") for d in docs]


def test_build_contents(tmp_path):
  docs = write_docs(tmp_path / "d.txt")
  c, tok = prepare_dataset(str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all",
                           progress=False)
  want = []
  for d in docs:
    want += list(d.encode()) + [tok.eod_id]
  assert c.dtype == np.uint16 and c.num_docs == len(docs)
  np.testing.assert_array_equal(c.tokens, want)
  assert [tok.decode(c.tokens[s:s + 17]) for s in c.doc_offsets[:2]] == [
      "document number 0", "document number 1"]
  h = json.loads(open(os.path.join(c.path, "header.json")).read())
  assert h["tokenizer_hash"] == tok.hash and h["sources"][0][0] == "d.txt"
  assert h["vocab_size"] == 257 and h["num_tokens"] == len(want)


def test_reuse_and_rebuild_on_change(tmp_path, monkeypatch):
  write_docs(tmp_path / "d.txt")
  args = (str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all")
  c1, _ = prepare_dataset(*args, progress=False)
  calls = []
  real_build = cache_lib.build
  monkeypatch.setattr(cache_lib, "build", lambda *a, **k: calls.append(1) or real_build(*a, **k))
  c2, _ = prepare_dataset(*args, progress=False)
  assert calls == [] and c2.path == c1.path and c2.num_tokens == c1.num_tokens
  (tmp_path / "d.txt").write_text("changed text")
  c3, _ = prepare_dataset(*args, progress=False)
  assert calls == [1] and c3.num_tokens == len("changed text") + 1
  # the same size and the old mtime: only the content digest tells
  stat = os.stat(tmp_path / "d.txt")
  (tmp_path / "d.txt").write_text("CHANGED TEXT")
  os.utime(tmp_path / "d.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
  c4, _ = prepare_dataset(*args, progress=False)
  assert calls == [1, 1] and c4.tokens[:7].tolist() == list(b"CHANGED")


def test_content_digest_samples_large_files(tmp_path, monkeypatch):
  from vesperjax.data import sources
  monkeypatch.setattr(sources, "SAMPLE_WHOLE", 1000)
  monkeypatch.setattr(sources, "SAMPLE_BLOCKS", 4)
  monkeypatch.setattr(sources, "SAMPLE_BLOCK", 10)
  data = bytearray(b"x" * 5000)
  path = tmp_path / "big.txt"

  def digest():
    path.write_bytes(bytes(data))
    return sources.content_digest(str(path), len(data))

  base = digest()
  for at in (0, 4999, 1664):  # first, last, and inside the block at 4990 * 1 // 3
    data[at] = ord("y")
    assert digest() != base, at
    data[at] = ord("x")
  data[800] = ord("y")  # between blocks: the documented blind spot of sampling
  assert digest() == base


@pytest.mark.parametrize("damage", ["truncate", "bad_json", "wrong_tokenizer", "no_tokens"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage, capsys):
  write_docs(tmp_path / "d.txt")
  args = (str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all")
  c, _ = prepare_dataset(*args, progress=False)
  good = np.array(c.tokens)
  hp, tp = os.path.join(c.path, "header.json"), os.path.join(c.path, "tokens.bin")
  if damage == "truncate":
    with open(tp, "r+b") as f:
      f.truncate(10)
  elif damage == "bad_json":
    open(hp, "w").write("{")
  elif damage == "wrong_tokenizer":
    h = json.load(open(hp))
    h["tokenizer_hash"] = "0" * 16
    json.dump(h, open(hp, "w"))
  else:
    os.remove(tp)
  with pytest.raises(errors.CacheError):
    TokenCache.open(c.path, {"tokenizer_hash": c.header["tokenizer_hash"]})
  c2, _ = prepare_dataset(*args, progress=False)
  np.testing.assert_array_equal(c2.tokens, good)
  assert "rebuilding token cache" in capsys.readouterr().err


def test_chunked_build_matches_one_shot(tmp_path, monkeypatch):
  docs = write_docs(tmp_path / "d.txt", 200)
  src = sources.open_source(str(tmp_path / "d.txt"), "all")
  tok = byte_tokenizer()
  one = cache_lib.build(src, tok, str(tmp_path / "one"), progress=False)
  monkeypatch.setattr(sources, "READ_BYTES", 8)  # documents arrive in many pieces
  monkeypatch.setattr(cache_lib, "BATCH_CHARS", 30)  # and cross encode batches
  many = cache_lib.build(src, tok, str(tmp_path / "many"), progress=False)
  np.testing.assert_array_equal(one.tokens, many.tokens)
  np.testing.assert_array_equal(one.doc_offsets, many.doc_offsets)
  assert many.num_docs == len(docs)


def test_failed_build_leaves_nothing(tmp_path):
  p = tmp_path / "d.jsonl"
  p.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(50)) + "{bad\n")
  with pytest.raises(errors.MalformedRecordError, match=r"d\.jsonl:51"):
    prepare_dataset(str(p), "byte", str(tmp_path / "c"), "all", progress=False)
  assert os.listdir(tmp_path / "c") == []


def test_crash_leftovers_are_cleaned(tmp_path):
  write_docs(tmp_path / "d.txt")
  src = sources.open_source(str(tmp_path / "d.txt"), "all")
  path = cache_lib.cache_path(str(tmp_path / "c"), src, byte_tokenizer())
  os.makedirs(f"{path}.tmp-999999999-deadbeef")  # a dead pid's half-written build
  prepare_dataset(str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all",
                  progress=False)
  assert os.listdir(tmp_path / "c") == [os.path.basename(path)]


def test_uint32_for_large_vocab(tmp_path):
  vocab = {f"w{i}": i for i in range(70000)}
  vocab["[UNK]"] = 70000
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "big.json"))
  (tmp_path / "d.txt").write_text("w1 w69999 w5\n\nw7")
  c, t = prepare_dataset(str(tmp_path / "d.txt"), str(tmp_path / "big.json"),
                         str(tmp_path / "c"), "all", progress=False)
  assert c.dtype == np.uint32 and t.eod_id == 70001
  np.testing.assert_array_equal(c.tokens, [1, 69999, 5, 70001, 7, 70001])


def test_train_val_and_empty_val(tmp_path, capsys):
  (tmp_path / "d.jsonl").write_text("".join(
      json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300)))
  tr, va, tok = prepare_train_val(str(tmp_path / "d.jsonl"), "byte", str(tmp_path / "c"),
                                  progress=False)
  assert tr.num_docs + va.num_docs == 300 and va.num_docs > 0
  (tmp_path / "one.txt").write_text("a single document")
  tr, va, tok = prepare_train_val(str(tmp_path / "one.txt"), "byte", str(tmp_path / "c"),
                                  progress=False)
  assert va is None and "no validation data" in capsys.readouterr().err
  tr, va, tok = prepare_train_val(str(tmp_path / "one.txt"), "byte", str(tmp_path / "c"),
                                  val_dataset=str(tmp_path / "d.jsonl"), progress=False)
  assert tr.num_docs == 1 and va.num_docs == 300


def test_stdlib_bpe_subset(tmp_path, monkeypatch):
  root = os.path.join(sources.stdlib_root(), "json")
  monkeypatch.setattr(sources, "stdlib_root", lambda: root)
  tr, va, tok = prepare_train_val("stdlib", "bpe:512", str(tmp_path), progress=False)
  assert tok.vocab_size <= 512 and tr.num_tokens > 1000 and tr.vocab_size == tok.vocab_size
  assert va is None or va.header["tokenizer_hash"] == tok.hash
