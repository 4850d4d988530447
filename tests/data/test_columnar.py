"""Parquet and Arrow sources: globs, folders, lists, save_to_disk folders, the cache path,
splits, and every bad-input path."""
import json
import os
import re
import sys

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.ipc  # noqa: F401  (makes pa.ipc available)
import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top,g-bad-import-order

from vesperjax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
from vesperjax.data import columnar, errors, prepare_dataset, sources
from vesperjax.data.__main__ import main as data_main


def texts(n, start=0):
  """Rows with a null, an empty string and one long row among short ones."""
  out = [f"row {i}: " + "lorem ipsum " * (i % 5) for i in range(start, start + n)]
  out[3] = None
  out[5] = ""
  out[7] = "long line of words " * 400 + "\nend"
  return out


def write_parquet(path, rows, row_group_size=4, compression="snappy", **columns):
  table = pa.table({"text": pa.array(rows, pa.string()), "id": list(range(len(rows))),
                    **columns})
  pq.write_table(table, path, row_group_size=row_group_size, compression=compression)
  assert pq.ParquetFile(path).num_row_groups > 1 or len(rows) <= row_group_size


def write_arrow_stream(path, rows, batch_rows=4):
  schema = pa.schema([("text", pa.large_string()), ("id", pa.int64())])
  with pa.ipc.new_stream(str(path), schema) as w:
    for s in range(0, len(rows), batch_rows):
      chunk = rows[s:s + batch_rows]
      w.write_batch(pa.record_batch(
          [pa.array(chunk, pa.large_string()), pa.array(range(s, s + len(chunk)))],
          schema=schema))


def save_to_disk_folder(folder, shards):
  """What `datasets.Dataset.save_to_disk` writes: data-*.arrow IPC streams, state.json
  listing them, dataset_info.json."""
  os.makedirs(folder)
  names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
  for name, rows in zip(names, shards):
    write_arrow_stream(os.path.join(folder, name), rows)
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump({"_data_files": [{"filename": n} for n in names], "_fingerprint": "x",
               "_split": "train"}, f)
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump({"features": {"text": {"dtype": "string", "_type": "Value"}}}, f)


def docs(spec, split="all", **kw):
  return list(sources.open_source(spec, split, **kw).documents())


def present(rows):
  return [r for r in rows if r]


def test_parquet_rows_stream_row_group_by_row_group(tmp_path, monkeypatch):
  rows = texts(30)
  write_parquet(tmp_path / "d.parquet", rows)
  read = []
  real = pq.ParquetFile.read_row_group
  monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                      lambda self, i, **kw: read.append((i, kw)) or real(self, i, **kw))
  monkeypatch.setattr(pq.ParquetFile, "read", None)  # never the whole file
  stream = columnar.rows(str(tmp_path / "d.parquet"), "parquet", "text")
  assert next(stream) == (0, rows[0])
  assert read == [(0, {"columns": ["text"]})]  # one row group, the text column alone
  got = [(0, rows[0]), *stream]
  assert got == [(i, r) for i, r in enumerate(rows) if r]
  assert [i for i, _ in read] == list(range(8))


def test_long_row_is_cut_and_rejoined(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "PIECE_CHARS", 500)
  rows = texts(12)
  write_parquet(tmp_path / "d.parquet", rows)
  src = sources.open_source(str(tmp_path / "d.parquet"), "all")
  pieces = list(src.pieces())
  assert max(len(t) for t, _ in pieces) <= 500
  assert len(pieces) > len(present(rows))
  assert list(src.documents()) == present(rows)


def test_parquet_cache_equals_jsonl_cache(tmp_path):
  rows = texts(40)
  write_parquet(tmp_path / "d.parquet", rows)
  with open(tmp_path / "d.jsonl", "w") as f:
    for r in present(rows):
      f.write(json.dumps({"text": r}) + "\n")
  kw = dict(progress=False)
  par, tok = prepare_dataset(str(tmp_path / "d.parquet"), "byte", str(tmp_path / "c"), "all",
                             **kw)
  ref, _ = prepare_dataset(str(tmp_path / "d.jsonl"), "byte", str(tmp_path / "c"), "all",
                           **kw)
  want = np.concatenate([list(r.encode()) + [tok.eod_id] for r in present(rows)])
  np.testing.assert_array_equal(ref.tokens, want)
  np.testing.assert_array_equal(par.tokens, want)
  np.testing.assert_array_equal(par.doc_offsets, ref.doc_offsets)


def test_split_hashes_path_and_row(tmp_path):
  shard = tmp_path / "shards"
  shard.mkdir()
  rows = {f"{k}.parquet": texts(200, start=1000 * k) for k in range(2)}
  for name, r in rows.items():
    write_parquet(shard / name, r, row_group_size=32)
  want = {split: [r for name, rs in sorted(rows.items()) for i, r in enumerate(rs)
                  if r and (sources.in_split(f"{name}#{i}", "val", 10.0) == (split == "val"))]
          for split in ("train", "val")}
  assert 0 < len(want["val"]) < len(want["train"])
  for spec in (str(shard), str(shard / "*.parquet"),
               f"{shard / '0.parquet'},{shard / '1.parquet'}",
               [str(shard / "0.parquet"), str(shard / "1.parquet")]):
    for split in ("train", "val"):
      assert docs(spec, split, val_percent=10.0) == want[split], (spec, split)
  assert docs(str(shard) + ":val", None, val_percent=10.0) == want["val"]
  assert docs(f"{shard}/*.parquet:val", None, val_percent=10.0) == want["val"]


def test_globs_lists_and_mixed_kinds(tmp_path):
  (tmp_path / "a").mkdir()
  write_parquet(tmp_path / "a" / "x.parquet", texts(10))
  write_parquet(tmp_path / "a" / "y.parquet", texts(10, start=50))
  (tmp_path / "a" / "notes.md").write_text("not matched")
  (tmp_path / "b.txt").write_text("plain one\n\nplain two")
  both = present(texts(10)) + present(texts(10, start=50))
  assert docs(str(tmp_path / "a" / "*.parquet")) == both
  assert docs(str(tmp_path / "**" / "y.parquet")) == present(texts(10, start=50))
  src = sources.open_source(f"{tmp_path}/a/*.parquet,{tmp_path}/b.txt,"
                            f"{tmp_path}/a/x.parquet", "all")  # x twice: read once
  assert list(src.documents()) == both + ["plain one", "plain two"]
  assert [f.rel for f in src.files] == ["x.parquet", "y.parquet", "b.txt"]
  assert src.name == "a+2"
  assert docs([str(tmp_path / "b.txt"), str(tmp_path / "a")]) == ["plain one",
                                                                  "plain two"] + both


def test_save_to_disk_folder_reads_the_listed_arrow_files(tmp_path):
  folder = tmp_path / "hf"
  shards = [texts(9), texts(8, start=100)]
  save_to_disk_folder(str(folder), shards)
  write_arrow_stream(folder / "cache-abc.arrow", ["stale map() output"])  # not listed
  src = sources.open_source(str(folder), "all")
  assert [f.rel for f in src.files] == ["data-00000-of-00002.arrow",
                                        "data-00001-of-00002.arrow"]
  assert list(src.documents()) == present(shards[0]) + present(shards[1])
  # A DatasetDict folder: its splits are subfolders, dataset_dict.json is not data.
  dd = tmp_path / "dd"
  save_to_disk_folder(str(dd / "train"), [texts(8)])
  (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
  assert docs(str(dd)) == present(texts(8))


def test_arrow_ipc_file_format(tmp_path):
  rows = texts(10)
  table = pa.table({"text": rows})
  with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as w:
    for batch in table.to_batches(max_chunksize=3):
      w.write_batch(batch)
  assert docs(str(tmp_path / "d.arrow")) == present(rows)


def test_dictionary_encoded_text_column(tmp_path):
  rows = ["same", None, "other", "same"]
  pq.write_table(pa.table({"text": pa.array(rows).dictionary_encode()}),
                 tmp_path / "d.parquet")
  assert docs(str(tmp_path / "d.parquet")) == ["same", "other", "same"]


def test_text_field_picks_the_column(tmp_path):
  write_parquet(tmp_path / "d.parquet", ["a", "b"], content=["x", "y"])
  assert docs(str(tmp_path / "d.parquet"), text_field="content") == ["x", "y"]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_missing_column_lists_columns(tmp_path, kind):
  path = str(tmp_path / f"d.{kind}")
  (write_parquet if kind == "parquet" else write_arrow_stream)(path, ["a", "b"])
  with pytest.raises(errors.MalformedRecordError,
                     match=rf"^{path}: no column 'body' \(columns: text, id\)"):
    docs(path, text_field="body")


def test_non_string_column(tmp_path):
  write_parquet(tmp_path / "d.parquet", ["a", "b"])
  with pytest.raises(errors.MalformedRecordError,
                     match=r"d\.parquet: column 'id' holds int64, not strings"):
    docs(str(tmp_path / "d.parquet"), text_field="id")


def corrupt_row_group(path, group):
  """Scribble over the text column's first page in row group `group` (footer intact)."""
  col = pq.read_metadata(path).row_group(group).column(0)
  start = col.dictionary_page_offset or col.data_page_offset
  raw = bytearray(open(path, "rb").read())
  raw[start + 30:start + 90] = b"\xab" * 60
  open(path, "wb").write(bytes(raw))


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
  p = str(tmp_path / "cut.parquet")
  write_parquet(p, texts(20))
  raw = open(p, "rb").read()
  open(p, "wb").write(raw[:len(raw) // 2])
  with pytest.raises(errors.DecodeError, match=r"cut\.parquet: corrupt or truncated Parquet"):
    docs(p)
  q = str(tmp_path / "bad.parquet")
  write_parquet(q, texts(20))
  corrupt_row_group(q, 2)
  read = []
  with pytest.raises(errors.DecodeError, match=r"bad\.parquet: corrupt or truncated Parquet"):
    for doc in sources.open_source(q, "all").documents():
      read.append(doc)
  assert read == present(texts(20)[:8])  # found while reading, in row group 2
  s = str(tmp_path / "s.arrow")
  write_arrow_stream(s, texts(20))
  raw = open(s, "rb").read()
  for cut in (8, 100):  # at a message boundary, inside a message
    open(s, "wb").write(raw[:-cut])
    with pytest.raises(errors.DecodeError, match=r"s\.arrow: truncated Arrow stream"):
      docs(s)
  empty = tmp_path / "folder"
  empty.mkdir()
  (empty / "0.parquet").write_bytes(b"")  # an interrupted copy: not skipped like empty text
  with pytest.raises(errors.DecodeError, match=r"0\.parquet: corrupt or truncated"):
    docs(str(empty))
  mid = str(tmp_path / "mid.arrow")
  open(mid, "wb").write(raw[:len(raw) // 2] + raw[-8:])  # a cut the end marker hides
  with pytest.raises(errors.DecodeError, match=r"mid\.arrow: corrupt or truncated Arrow"):
    docs(mid)


def test_bad_shard_fails_before_any_reading(tmp_path, monkeypatch):
  write_parquet(tmp_path / "a.parquet", texts(10))
  write_parquet(tmp_path / "b.parquet", texts(10), text=pa.array(range(10)))
  calls = []
  monkeypatch.setattr(columnar, "rows", lambda *a: calls.append(a) or iter(()))
  with pytest.raises(errors.MalformedRecordError, match=r"b\.parquet: column 'text' holds"):
    docs(str(tmp_path))
  assert not calls


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
  shards = tmp_path / "shards"
  shards.mkdir()
  write_parquet(shards / "0.parquet", texts(40))
  write_parquet(shards / "1.parquet", texts(40))
  corrupt_row_group(str(shards / "1.parquet"), 5)
  monkeypatch.setattr(cache_lib, "BATCH_CHARS", 200)  # tokens are written before the error
  out = tmp_path / "c"
  with pytest.raises(errors.DecodeError, match=r"1\.parquet: corrupt"):
    prepare_dataset(f"{shards}/*.parquet", "byte", str(out), "all", progress=False)
  assert os.listdir(out) == []


def test_changed_shard_rebuilds_the_cache(tmp_path, capsys):
  shards = tmp_path / "shards"
  shards.mkdir()
  write_parquet(shards / "0.parquet", texts(20))
  write_parquet(shards / "1.parquet", texts(20, start=20), compression="none")
  args = (str(shards), "byte", str(tmp_path / "c"), "all")
  first, tok = prepare_dataset(*args, progress=False)
  again, _ = prepare_dataset(*args, progress=False)
  assert again.path == first.path and "rebuilding" not in capsys.readouterr().err
  stat = os.stat(shards / "1.parquet")
  changed = texts(20, start=20)
  changed[12] = changed[12].replace("lorem", "LOREM")  # neither the min nor the max row
  assert changed != texts(20, start=20)
  write_parquet(shards / "1.parquet", changed, compression="none")
  os.utime(shards / "1.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.path.getsize(shards / "1.parquet") == stat.st_size  # only the content differs
  rebuilt, _ = prepare_dataset(*args, progress=False)
  assert "rebuilding token cache" in capsys.readouterr().err
  want = [list(r.encode()) + [tok.eod_id] for r in present(texts(20)) + present(changed)]
  np.testing.assert_array_equal(rebuilt.tokens, np.concatenate(want))


def test_progress_total_counts_text_not_compressed_bytes(tmp_path):
  rows = [f"{i} " + "the same words again " * 50 for i in range(200)]
  write_parquet(tmp_path / "d.parquet", rows, row_group_size=50)
  src = sources.open_source(str(tmp_path / "d.parquet"), "all")
  text = sum(len(r.encode()) for r in rows)
  assert src.total_bytes() < text / 4  # compressed
  assert text <= src.text_bytes() < 1.5 * text


def test_empty_glob_and_missing_entry(tmp_path):
  with pytest.raises(errors.EmptySourceError, match=r"nothing/\*\.parquet: no files match"):
    sources.open_source(f"{tmp_path}/nothing/*.parquet")
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(errors.MissingPathError, match=r"nope\.parquet: no such file"):
    sources.open_source(f"{tmp_path}/a.txt,{tmp_path}/nope.parquet")
  with pytest.raises(errors.DataError, match=r"empty entry"):
    sources.open_source(f"{tmp_path}/a.txt,")


def test_comma_in_an_existing_path_is_not_a_list(tmp_path):
  p = tmp_path / "a,b.txt"
  p.write_text("one")
  assert docs(str(p)) == ["one"]


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
  write_parquet(tmp_path / "d.parquet", ["a"])
  for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
    monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
  with pytest.raises(errors.DataError, match=r"pip install 'vesperjax\[arrow\]'"):
    docs(str(tmp_path / "d.parquet"))


@pytest.mark.parametrize("field,match", [
    ("body", r"no column 'body' \(columns: text, id\)"),
    ("id", r"column 'id' holds int64"),
])
def test_cli_one_error_line(tmp_path, capsys, field, match):
  (tmp_path / "s").mkdir()
  write_parquet(tmp_path / "s" / "0.parquet", texts(10))
  out = tmp_path / "c"
  assert data_main(["build", "--dataset", f"{tmp_path}/s/*.parquet", "--tokenizer", "byte",
                    "--out", str(out), "--text-field", field, "--quiet"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "0.parquet" in err[0]
  assert re.search(match, err[0])
  assert not out.exists() or os.listdir(out) == []
