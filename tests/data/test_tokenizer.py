"""Tokenizers: byte, trained BPE, files, specs, hashing."""
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from vesperjax.data import errors, padded_vocab_size, resolve_tokenizer
from vesperjax.data.tokenizer import EOD, Tokenizer, byte_tokenizer, parse_spec, train_bpe

TEXT = "def f(x):\n  return x + 1\n\nclass A:\n  pass\n" * 50


def test_byte_tokenizer_ids_are_bytes():
  t = byte_tokenizer()
  s = "héllo\n\t~"
  assert t.encode(s) == list(s.encode("utf-8"))
  assert t.decode(t.encode(s)) == s
  assert (t.vocab_size, t.eod_id, t.eod_token) == (257, 256, EOD)


def test_eod_string_in_text_is_plain_text():
  for t in (byte_tokenizer(), train_bpe(iter([TEXT]), 300)):
    ids = t.encode("a<|endoftext|>b")
    assert t.eod_id not in ids and t.decode(ids) == "a<|endoftext|>b"


def test_bpe_train_save_load_hash(tmp_path):
  t = train_bpe(iter([TEXT] * 3), 300)
  assert t.vocab_size <= 300 and t.eod_id == 0
  assert len(t.encode(TEXT)) < len(TEXT.encode()) / 2  # it learned merges
  t.save(str(tmp_path / "tok.json"))
  u = Tokenizer.from_file(str(tmp_path / "tok.json"))
  assert u.hash == t.hash and u.encode(TEXT) == t.encode(TEXT)
  assert u.hash != byte_tokenizer().hash


def test_file_without_eod_gets_one(tmp_path):
  tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, "[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "w.json"))
  t = Tokenizer.from_file(str(tmp_path / "w.json"))
  assert t.eod_token == EOD and t.eod_id == 3 and t.vocab_size == 4


def test_bad_tokenizer_file(tmp_path):
  p = tmp_path / "tokenizer.json"
  p.write_text("{not json")
  with pytest.raises(errors.TokenizerError, match="tokenizer.json"):
    Tokenizer.from_file(str(p))
  with pytest.raises(errors.MissingPathError):
    Tokenizer.from_file(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("spec", ["gpt2", "bpe:abc", "bpe:100", "sentencepiece:1"])
def test_bad_specs(spec):
  with pytest.raises(errors.TokenizerError):
    parse_spec(spec)


def test_padded_vocab_size():
  assert [padded_vocab_size(n) for n in (1, 128, 129, 257, 8192)] == [128, 128, 256, 384, 8192]
  assert padded_vocab_size(257, 64) == 320


def test_resolve_bpe_is_cached(tmp_path):
  (tmp_path / "d.txt").write_text(TEXT)
  a = resolve_tokenizer("bpe:300", str(tmp_path / "d.txt"), str(tmp_path / "c"),
                        progress=False)
  assert a.path and a.path.startswith(str(tmp_path / "c"))
  b = resolve_tokenizer("bpe:300", str(tmp_path / "d.txt"), str(tmp_path / "c"),
                        progress=False)
  assert b.hash == a.hash and b.path == a.path
  f = resolve_tokenizer(a.path, "unused", str(tmp_path / "c"))
  assert f.hash == a.hash
