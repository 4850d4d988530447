"""Weighted data mixtures: the index, proportions, exact resume, host sharding,
validation, the BPE sample, the logged shares and the config errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vesperjax.data import errors, eval_batches, train_iterator
from vesperjax.data.cache import FORMAT_VERSION, TokenCache
from vesperjax.data.mixture import Mixture, MixtureIndex, parse_mixture, sample_texts
from vesperjax.data.prepare import prepare_mixture
from vesperjax.run_config import RunConfig, default_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OFFSET = 1_000_000  # source s's token at position p is s * OFFSET + p
SEQ = 16


def make_cache(path, n, source):
  """A cache whose tokens name their source and position: a row names its window."""
  os.makedirs(path)
  tokens = source * OFFSET + np.arange(n, dtype=np.uint32)
  tokens.tofile(os.path.join(path, "tokens.bin"))
  np.zeros(1, np.int64).tofile(os.path.join(path, "docs.bin"))
  json.dump({"format_version": FORMAT_VERSION, "num_tokens": n, "num_docs": 1,
             "dtype": "uint32", "vocab_size": 2 * OFFSET, "eod_id": 0},
            open(os.path.join(path, "header.json"), "w"))
  return TokenCache.open(str(path))


def make_mixture(tmp_path, windows=(20, 10), weights=(0.7, 0.3), names=("web", "code")):
  caches = tuple(make_cache(tmp_path / n, SEQ * w + 3, s)
                 for s, (n, w) in enumerate(zip(names, windows)))
  return Mixture(tuple(names), caches, tuple(weights))


def rows(batches):
  """(source, first token position) of every row of every batch."""
  return [(int(r[0]) // OFFSET, int(r[0]) % OFFSET) for b in batches for r in b]


def one_host(**kw):
  return dict(process_index=0, process_count=1, **kw)


@pytest.mark.parametrize("weights", [(0.7, 0.3), (5, 3, 2), (1 / 3, 1 / 3, 1 / 3),
                                     (0.9, 0.05, 0.05)])
def test_index_is_exact_and_close_to_the_weights(weights):
  """Position by position the index agrees with its counts; the counts sum to n and stay
  within K (the number of sources) of n * w_i: each level of the recursive floor adds
  less than one position of error."""
  index = MixtureIndex(weights)
  k = len(weights)
  seen = [0] * k
  total = sum(weights)
  for n in range(1, 3001):
    source, key = index[n - 1]
    assert key == seen[source]  # each source's stream is read in order, none skipped
    seen[source] += 1
    assert index.counts(n) == seen
    assert all(abs(c - n * w / total) < k for c, w in zip(seen, weights))


def test_observed_proportions_match_the_weights(tmp_path):
  """Rows per source over many batches (identified by their tokens, not by the index)
  are n * w within K = 2, and equal the shares the run logs."""
  mix = make_mixture(tmp_path)
  it = train_iterator(mix, SEQ, 8, seed=0, **one_host())
  got = rows(next(it) for _ in range(50))
  n = len(got)
  web = sum(1 for s, _ in got if s == 0)
  assert abs(web - 0.7 * n) < 2 and abs((n - web) - 0.3 * n) < 2
  assert mix.share_scalars(n) == {"data/share/web": web / n,
                                  "data/share/code": (n - web) / n}
  # each source is its own shuffled stream: its first epoch is every window once
  first_code = [p for s, p in got if s == 1][:10]
  assert sorted(first_code) == list(range(0, 10 * SEQ, SEQ))
  assert first_code != sorted(first_code)


def test_resume_mid_epoch_is_exact(tmp_path):
  """The restored iterator yields the uninterrupted run's batches, across epoch
  boundaries of both sources (20 and 10 windows, 6 rows per batch)."""
  mix = make_mixture(tmp_path)
  it = train_iterator(mix, SEQ, 6, seed=3, **one_host())
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  want = [next(it) for _ in range(12)]
  again = train_iterator(mix, SEQ, 6, seed=3, **one_host())
  again.set_state(state)
  for a, b in zip(want, (next(again) for _ in range(12))):
    np.testing.assert_array_equal(a, b)
  assert sum(1 for s, _ in rows(want) if s == 1) > 10  # past code's first epoch


def test_worker_processes_read_the_same_mixture(tmp_path):
  """With grain workers (the mixture pickled into them) the batches and the resumed
  batches are the in-process ones."""
  mix = make_mixture(tmp_path)
  plain = train_iterator(mix, SEQ, 4, seed=0, **one_host())
  want = rows(next(plain) for _ in range(9))
  it = train_iterator(mix, SEQ, 4, seed=0, num_workers=1, **one_host())
  first = [next(it) for _ in range(6)]
  state = it.get_state()
  rest = [next(it) for _ in range(3)]
  assert rows(first + rest) == want
  again = train_iterator(mix, SEQ, 4, seed=0, num_workers=1, **one_host())
  again.set_state(state)
  assert rows(next(again) for _ in range(3)) == rows(rest)


def test_two_hosts_read_disjoint_rows_of_the_same_global_batch(tmp_path):
  mix = make_mixture(tmp_path, windows=(40, 20), weights=(2, 1))
  one = train_iterator(mix, SEQ, 8, seed=1, **one_host(num_epochs=1))
  want = list(one)
  hosts = [list(train_iterator(mix, SEQ, 8, seed=1, process_index=p, process_count=2,
                               num_epochs=1)) for p in range(2)]
  assert len(want) == len(hosts[0]) == len(hosts[1]) == 60 // 8
  for w, a, b in zip(want, *hosts):
    assert a.shape == b.shape == (4, SEQ + 1)
    np.testing.assert_array_equal(np.concatenate([a, b]), w)
  r0, r1 = set(rows(hosts[0])), set(rows(hosts[1]))
  assert not r0 & r1 and len(r0) + len(r1) == 56  # one epoch: every row distinct


def test_seed_and_names_set_the_order(tmp_path):
  mix = make_mixture(tmp_path)
  def first(seed):
    return rows([next(train_iterator(mix, SEQ, 8, seed=seed, **one_host()))])
  assert first(0) == first(0)
  assert first(0) != first(1)


def test_eval_batches_mix_held_out_windows_in_order(tmp_path):
  mix = make_mixture(tmp_path, windows=(14, 6), weights=(0.7, 0.3))
  a = list(eval_batches(mix, 4, SEQ, **one_host()))
  assert a and all(b.shape == (4, SEQ + 1) for b in a)
  got = rows(a)
  assert got == rows(eval_batches(mix, 4, SEQ, **one_host()))  # the same every call
  for source in (0, 1):  # each source's windows in order from the start
    pos = [p for s, p in got if s == source]
    assert pos == list(range(0, SEQ * len(pos), SEQ))
  counts = MixtureIndex((0.7, 0.3)).counts(len(got))
  assert [sum(1 for s, _ in got if s == i) for i in (0, 1)] == counts
  with pytest.raises(errors.DatasetTooSmallError, match="mixture"):
    list(eval_batches(mix, 64, SEQ, **one_host()))


def test_sample_texts_follows_the_weights():
  a = iter(["a" * 10] * 1000)
  b = iter(["b" * 10] * 1000)
  text = "".join(sample_texts([a, b], [3, 1], max_bytes=400))
  assert text.count("a") == 300 and text.count("b") == 100
  assert "b" in text[:40]  # interleaved, not one source after the other
  short = iter(["c" * 10] * 2)  # a source that runs out leaves its budget unused
  text = "".join(sample_texts([short, iter(["d" * 10] * 100)], [1, 1], max_bytes=200))
  assert text.count("c") == 20 and text.count("d") == 100


def write_corpora(tmp_path):
  """Two corpora that bytes tell apart: lowercase words, and digit groups."""
  rng = np.random.default_rng(0)
  letters = "\n\n".join(" ".join("".join(rng.choice(list("abcdefgh"), 5))
                                  for _ in range(40)) for _ in range(60))
  digits = "\n\n".join(" ".join("".join(rng.choice(list("0123456789"), 4))
                                 for _ in range(40)) for _ in range(60))
  (tmp_path / "web.txt").write_text(letters)
  (tmp_path / "code.txt").write_text(digits)
  return str(tmp_path / "web.txt"), str(tmp_path / "code.txt")


def test_prepare_mixture_caches_each_source_with_one_bpe(tmp_path):
  web, code = write_corpora(tmp_path)
  mix = parse_mixture(f"web={web}:0.6,code={code}:0.4")
  train, val, tok = prepare_mixture(mix, "bpe:300", str(tmp_path / "c"), progress=False)
  assert train.names == ("web", "code") and train.weights == (0.6, 0.4)
  assert len({c.path for c in train.caches}) == 2
  assert all(c.num_tokens > 0 for c in train.caches)
  assert isinstance(val, Mixture) and val.names == ("web", "code")
  assert os.path.basename(tok.path).startswith("tokenizer-bpe300-mix-web-code-")
  # trained on both sources: each one's typical text takes fewer tokens than bytes
  assert len(tok.encode("abcde fghab")) < 11 and len(tok.encode("0123 4567")) < 9
  again, _, tok2 = prepare_mixture(mix, "bpe:300", str(tmp_path / "c"), progress=False)
  assert tok2.path == tok.path and [c.path for c in again.caches] == [
      c.path for c in train.caches]  # reused, not rebuilt
  _, val, _ = prepare_mixture(mix, "byte", str(tmp_path / "c"), val_dataset=web,
                              progress=False)
  assert isinstance(val, TokenCache)


def test_training_logs_each_sources_share(tmp_path):
  """The logged `data/share/NAME` equal the shares of the rows the run was fed, counted
  from a fresh iterator's bytes (digits: the code corpus). With 0.65 / 0.35 the share
  after 16 rows differs from the share after 8, so a count that left out grad_accum
  would fail."""
  from vesperjax.train import train
  web, code = write_corpora(tmp_path)
  run = default_run_config("tiny")
  run.model.update(dict(hidden_size=32, num_heads=2, num_layers=1, ffn_size=64,
                        lora_rank=4, lora_topk=2))
  run.data.update(dict(mixture=f"web={web}:0.65,code={code}:0.35", tokenizer="byte",
                       seq_len=32))
  run.train.update(dict(batch_size=8, grad_accum=2, max_steps=3, eval_every=3,
                        save_every=3, log_every=1, eval_batches=1, sample_tokens=0))
  assert train(run, str(tmp_path / "run")) == 0
  logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  shares = {r["step"]: r for r in logged if "data/share/web" in r}
  assert sorted(shares) == [1, 2, 3]
  cfg = RunConfig.from_config_dict(run)
  train_mix, _, _ = prepare_mixture(parse_mixture(cfg.data.mixture), "byte",
                                    str(tmp_path / "run" / "data"), progress=False)
  it = train_iterator(train_mix, 32, 8, seed=0, **one_host())
  fed = []
  for step in (1, 2, 3):
    for _ in range(2):  # grad_accum host batches per step; a digit byte: code
      fed += [bool(np.isin(r, np.arange(ord("0"), ord("9") + 1)).any()) for r in next(it)]
    code_share = sum(fed) / len(fed)
    assert shares[step]["data/share/code"] == pytest.approx(code_share, abs=1e-12)
    assert shares[step]["data/share/web"] == pytest.approx(1 - code_share, abs=1e-12)
  assert any("eval_loss" in r for r in logged)  # validated on the held-out mixture


@pytest.mark.parametrize("mixture,message", [
    ("web=/a:0.7", "at least two"),
    ("web=/a:0.7,web=/b:0.3", "web: the name appears twice"),
    ("web=/a:0.7,code=/b:0", "code: weight '0' is not a positive number"),
    ("web=/a:0.7,code=/b:-1", "is not a positive number"),
    ("web=/a:0.7,code=/b:nan", "is not a positive number"),
    ("web=/a:0.7,code=/b", "the weight is the number after the last"),
    ("web=/a:0.7,code=/b:lots", "code: weight 'lots' is not a positive number"),
    ("web=/a:0.7,c d=/b:1", "NAME=PATH:WEIGHT"),
    ("web=/a:1,code=/b:1e-7", "code: weight 1e-07 is below 1e-6 of the largest"),
    ("web=/a:val:0.7,code=/b:1", "web: '/a:val' names a split"),
])
def test_config_errors_are_one_line(mixture, message):
  run = default_run_config("tiny")
  run.data.mixture = mixture
  with pytest.raises(ValueError) as e:
    RunConfig.from_config_dict(run)
  assert str(e.value).startswith("config.data.mixture: ") and message in str(e.value)
  assert "\n" not in str(e.value)


def test_cli_refuses_mixture_and_dataset_together(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-m", "vesperjax.train", "--config", "experiments/tiny.py",
       f"--workdir={tmp_path / 'run'}", "--config.data.dataset=/x.txt",
       "--config.data.mixture=web=/a:0.7,code=/b:0.3"],
      cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert lines[-1].startswith("error: config.data.mixture: set data.mixture or "
                              "data.dataset, not both"), r.stderr
  assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()
