"""Damaged inputs are named, never trained on: token caches whose bytes changed (same
size), token ids outside the vocabulary, a workdir's tokenizer with swapped ids, and a
disk that fills up while tokenizing or saving the tokenizer."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import mounted_tmpfs
from tests.test_train import ROOT, cli, losses, overrides, tiny_run
from vesperjax.data import cache as cache_lib
from vesperjax.data import errors, prepare_dataset, prepare_train_val, sources
from vesperjax.data.cache import TokenCache
from vesperjax.data.tokenizer import Tokenizer, byte_tokenizer
from vesperjax.errors import one_line, user_errors
from vesperjax.train import train
from vesperjax.training.trainer import Trainer

BYTE_VOCAB = 257  # the byte tokenizer's: 256 bytes and the end-of-document token


def eval_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r}


def cache_of(workdir, split):
  (path,) = glob.glob(os.path.join(workdir, "data", f"*-{split}-*"))
  return path


def flip_tokens(tokens_bin, in_range, n=1000, seed=0):
  """Rewrite n uint16 ids (2 bytes each) in place, the file's size unchanged: each to
  another id inside the vocabulary, or to one outside it."""
  ids = np.fromfile(tokens_bin, np.uint16)
  rng = np.random.default_rng(seed)
  at = rng.choice(len(ids), n, replace=False)
  if in_range:
    new = (ids[at].astype(np.int64) + rng.integers(1, BYTE_VOCAB, n)) % BYTE_VOCAB
  else:
    new = rng.integers(BYTE_VOCAB, 1 << 16, n)
  ids[at] = new.astype(np.uint16)
  size = os.path.getsize(tokens_bin)
  with open(tokens_bin, "r+b") as f:  # in place: the same file, as a disk would damage it
    f.write(ids.tobytes())
  assert os.path.getsize(tokens_bin) == size


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
  """An uninterrupted 8-step run, and the same run stopped (and saved) at step 4."""
  full = tmp_path_factory.mktemp("full")
  assert train(tiny_run(corpus), str(full)) == 0
  part = tmp_path_factory.mktemp("part")
  trainer = Trainer(tiny_run(corpus), str(part))
  trainer.train(stop_at=4)
  trainer.close()
  return full, part


@pytest.mark.parametrize("split,in_range", [("train", True), ("train", False),
                                            ("val", False)],
                         ids=["train-in-range", "train-out-of-range", "val-out-of-range"])
def test_damaged_cache_is_rebuilt_before_training(runs, corpus, tmp_path, capsys,
                                                  split, in_range):
  full, part = runs
  work = tmp_path / "run"
  shutil.copytree(part, work)
  tokens = os.path.join(cache_of(work, split), "tokens.bin")
  good = open(tokens, "rb").read()
  flip_tokens(tokens, in_range)
  capsys.readouterr()
  assert train(tiny_run(corpus), str(work)) == 0
  err = capsys.readouterr().err
  said = [line for line in err.splitlines() if line.startswith("rebuilding token cache")]
  # one line naming the file and its damaged bytes (all in one 16 MiB chunk here)
  assert said == [f"rebuilding token cache: {tokens}: bytes 0-{len(good) - 1} differ from "
                  "the checksum recorded when the cache was built (damaged on disk)"], err
  assert "resumed from step 4" in err and "diverged" not in err
  assert open(tokens, "rb").read() == good  # rebuilt from the dataset
  want, got = losses(full), losses(work)
  assert all(got[s] == want[s] for s in range(5, 9)), (got, want)  # never the damage
  assert eval_losses(work)[8] == eval_losses(full)[8]


def test_ids_damaged_after_the_open_are_named_not_diverged(corpus, tmp_path):
  work = tmp_path / "run"
  trainer = Trainer(tiny_run(corpus, max_steps=40, save_every=100, eval_every=100),
                    str(work))
  try:
    trainer.train(stop_at=2)  # verified at the open; checkpoint 2 saved
    for split in ("val", "train"):
      tokens = os.path.join(cache_of(work, split), "tokens.bin")
      n = os.path.getsize(tokens) // 2
      with open(tokens, "r+b") as f:  # under the open memmap: every id now 60000
        f.write(np.full(n, 60000, np.uint16).tobytes())
      with pytest.raises(errors.CacheError) as e:
        trainer.evaluate() if split == "val" else trainer.train()
      assert isinstance(e.value, user_errors())  # the CLI's one `error:` line, exit 2
      line = one_line(e.value)
      assert re.fullmatch(
          rf"{re.escape(tokens)}: token id 60000 at token \d+ is outside the tokenizer's "
          rf"vocabulary of {BYTE_VOCAB} ids \(the file changed after its checksums were "
          rf"verified\); delete {re.escape(cache_of(work, split))} or run .* to rebuild it",
          line), line
    assert trainer.built.ckpt.latest_step() >= 2  # the steps before the failure were saved
    assert all(np.isfinite(v) for v in losses(work).values())  # no step on the damage
    assert int(trainer.state.skipped) == 0
  finally:
    trainer.close()


def test_damaged_chunk_is_named(tmp_path, monkeypatch):
  monkeypatch.setattr(cache_lib, "CHECK_CHUNK", 64)  # many chunks for a small cache
  (tmp_path / "d.txt").write_text("\n\n".join(f"document {i} " * 5 for i in range(50)))
  c, _ = prepare_dataset(str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all",
                         progress=False)
  size = c.num_tokens * 2
  assert len(c.header["checksums"]["tokens.bin"]) == -(-size // 64)
  TokenCache.open(c.path, verify=True)  # intact
  tokens = os.path.join(c.path, "tokens.bin")
  with open(tokens, "r+b") as f:
    f.seek(200)
    byte = f.read(1)
    f.seek(200)
    f.write(bytes([byte[0] ^ 1]))
  TokenCache.open(c.path)  # the header alone reads: nothing verified
  with pytest.raises(errors.DamagedCacheError, match=re.escape(
      f"{tokens}: bytes 192-255 differ from the checksum recorded when the cache was "
      "built (damaged on disk)")):
    TokenCache.open(c.path, verify=True)
  header = os.path.join(c.path, "header.json")
  h = json.load(open(header))
  h["vocab_size"] = 70000  # would let any id through
  json.dump(h, open(header, "w"))
  with pytest.raises(errors.DamagedCacheError, match="header.json: its fields differ"):
    TokenCache.open(c.path, verify=True)


def test_cache_without_checksums_is_rebuilt(tmp_path, capsys):
  (tmp_path / "d.txt").write_text("one document\n\nand another")
  args = (str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all")
  c, _ = prepare_dataset(*args, progress=False)
  header = os.path.join(c.path, "header.json")
  h = json.load(open(header))
  for key in ("checksums", "header_crc32"):
    del h[key]
  h["format_version"] = 1  # as the builds before checksums wrote it
  json.dump(h, open(header, "w"))
  c2, _ = prepare_dataset(*args, progress=False)
  assert (f"rebuilding token cache: {header}: format version 1 != 2 (built without "
          "checksums)") in capsys.readouterr().err.splitlines()
  assert c2.path == c.path and "checksums" in json.load(open(header))


def test_damaged_cache_is_one_line_in_the_data_cli(tmp_path):
  (tmp_path / "d.txt").write_text("\n\n".join(f"document {i}" for i in range(30)))
  c, _ = prepare_dataset(str(tmp_path / "d.txt"), "byte", str(tmp_path / "c"), "all",
                         progress=False)
  flip_tokens(os.path.join(c.path, "tokens.bin"), in_range=True, n=3)
  r = subprocess.run([sys.executable, "-m", "vesperjax.data", "info", c.path], cwd=ROOT,
                     capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: {c.path}/tokens.bin: bytes 0-{c.num_tokens * 2 - 1} differ from the "
      f"checksum recorded when the cache was built (damaged on disk); delete {c.path} or "
      "run `python -m vesperjax.data build` (or any run) on its dataset to rebuild it")
  assert "Traceback" not in r.stderr and r.stdout == ""


def test_content_hash_follows_the_ids_not_the_layout(tmp_path):
  tok = byte_tokenizer()
  tok.save(str(tmp_path / "a.json"))
  spec = json.load(open(tmp_path / "a.json"))
  spec["decoder"] = None  # decoding only: the ids mean the same
  with open(tmp_path / "b.json", "w") as f:
    json.dump(spec, f, indent=4, sort_keys=True)
  assert Tokenizer.from_file(str(tmp_path / "b.json")).content_hash == tok.content_hash
  vocab = spec["model"]["vocab"]
  vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
  with open(tmp_path / "c.json", "w") as f:
    json.dump(spec, f)
  assert Tokenizer.from_file(str(tmp_path / "c.json")).content_hash != tok.content_hash


def test_resume_with_swapped_tokenizer_ids_is_refused(runs, corpus, tmp_path):
  _, part = runs
  work = tmp_path / "run"
  shutil.copytree(part, work)
  path = work / "tokenizer.json"
  spec = json.load(open(path))
  vocab = spec["model"]["vocab"]
  vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
  path.write_text(json.dumps(spec))
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{work}/**", recursive=True)}
  r = cli(*overrides(corpus, work), "--config.train.max_steps=8")
  assert r.returncode == 2, r.stderr
  record = json.load(open(work / "tokenizer_hash.json"))  # written by the first run
  assert record["content_hash"] == byte_tokenizer().content_hash
  last = r.stderr.strip().splitlines()[-1]
  assert re.fullmatch(
      rf"error: {re.escape(str(path))}: content hash [0-9a-f]{{16}} differs from "
      rf"{record['content_hash']}, recorded in {re.escape(str(work))}/tokenizer_hash.json "
      r"when this workdir's run began \(its vocabulary, merges or added tokens changed\); "
      r"restore the tokenizer it was trained with or use a new --workdir", last), last
  assert "Traceback" not in r.stderr
  # refused before any cache was tokenized with it or any file rewritten
  after = {p: os.path.getmtime(p) for p in glob.glob(f"{work}/**", recursive=True)}
  assert after == before  # (glob skips the lock file, which the refused run took)


@pytest.fixture
def tiny_disk(tmp_path):
  """A 64 KB tmpfs: less than the corpus's token cache."""
  yield from mounted_tmpfs(tmp_path / "disk", "64k")


def test_disk_full_while_tokenizing_is_one_line(corpus, tmp_path, tiny_disk):
  name = sources.open_source(corpus, "train").name
  r = cli(*overrides(corpus, tmp_path / "run"), "--config.train.max_steps=2",
          f"--config.data.cache_dir={tiny_disk}")
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  last = r.stderr.rstrip("\n").split("\n")[-1]
  # the progress bar was closed (cleared) before the line: nothing of it precedes it
  assert re.fullmatch(
      rf"[\r ]*error: no space left on device while tokenizing {name}:train into a token "
      rf"cache \({re.escape(str(tiny_disk))}/{name}-train-[0-9a-f]{{16}}; \d+(\.\d)? "
      rf"[KM]?B free in {re.escape(str(tiny_disk))}\); its partial files were removed; "
      r"free some space or write to another disk", last), repr(last)
  assert os.listdir(tiny_disk) == []


def test_disk_full_while_saving_the_tokenizer(corpus, tiny_disk):
  with open(tiny_disk / "filler", "wb", buffering=0) as f:  # fill the disk up
    try:
      while f.write(b"\0" * 4096):
        pass
    except OSError:
      pass
  with pytest.raises(ValueError) as e:  # a DataError: one `error:` line in the CLI
    prepare_train_val(corpus, "bpe:300", str(tiny_disk), progress=False)
  assert isinstance(e.value, errors.DiskFullError)
  assert re.fullmatch(
      rf"no space left on device while saving the tokenizer "
      rf"\({re.escape(str(tiny_disk))}/tokenizer-bpe300-corpus-[0-9a-f]{{16}}\.json; "
      rf"\d+ B free in {re.escape(str(tiny_disk))}\); its partial files were removed; "
      r"free some space or write to another disk", one_line(e.value)), one_line(e.value)
  assert os.listdir(tiny_disk) == ["filler"]
