"""CLI: build / info, and one-line errors with a non-zero exit."""
import json
import os
import subprocess
import sys

import pytest

from vesperjax.data.__main__ import main


def test_build_and_info(tmp_path, capsys):
  (tmp_path / "d.jsonl").write_text("".join(
      json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(200)))
  out = str(tmp_path / "c")
  assert main(["build", "--dataset", str(tmp_path / "d.jsonl"), "--tokenizer", "bpe:300",
               "--out", out, "--quiet"]) == 0
  text = capsys.readouterr().out
  assert "d-train-" in text and "d-val-" in text and "tokenizer: vocab" in text
  assert main(["info", out]) == 0
  info = capsys.readouterr().out
  assert info.count("tokens ") == 2 and "dtype uint16" in info and "size on disk" in info
  caches = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]
  assert main(["info", os.path.join(out, caches[0])]) == 0


@pytest.mark.parametrize("setup,args,match", [
    (None, ["--dataset", "{t}/missing.txt", "--tokenizer", "byte"], "no such file"),
    ("empty", ["--dataset", "{t}/f.txt", "--tokenizer", "byte"], "f.txt: file is empty"),
    ("binary", ["--dataset", "{t}/f.txt", "--tokenizer", "byte"], "f.txt: binary"),
    ("badjsonl", ["--dataset", "{t}/f.jsonl", "--tokenizer", "byte"], "f.jsonl:2:"),
    ("nosquad", ["--dataset", "{t}/f.json", "--tokenizer", "byte"], "f.json: not a SQuAD"),
    ("text", ["--dataset", "{t}/f.txt", "--tokenizer", "wordpiece"], "unknown tokenizer"),
    ("text", ["--dataset", "{t}/f.txt", "--tokenizer", "{t}/tok.json"], "tok.json"),
])
def test_bad_input_one_line(tmp_path, capsys, setup, args, match):
  t = str(tmp_path)
  content = {"empty": ("f.txt", b""), "binary": ("f.txt", b"ab\0\1"),
             "badjsonl": ("f.jsonl", b'{"text": "a"}\n{"text"\n'),
             "nosquad": ("f.json", b'{"version": 1}'), "text": ("f.txt", b"hello")}
  if setup:
    name, data = content[setup]
    (tmp_path / name).write_bytes(data)
  (tmp_path / "tok.json").write_text("{broken")
  argv = ["build", "--out", f"{t}/c", "--quiet"] + [a.format(t=t) for a in args]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
  assert not os.path.exists(f"{t}/c") or not [
      d for d in os.listdir(f"{t}/c") if not d.startswith("tokenizer-")]


def test_subprocess_exit_code(tmp_path):
  r = subprocess.run([sys.executable, "-m", "vesperjax.data", "info", str(tmp_path / "x")],
                     capture_output=True, text=True)
  # our output is the one error line; lines before it may be log noise of an installed
  # CUDA plugin on a GPU-less host ("Could not find cuda drivers"), not ours
  errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == errors[0]
