"""Columnar sources: the text column of Parquet files and Arrow IPC files, streamed.

Parquet files (FineWeb's shards) are read one row group at a time, Arrow IPC files (the
`data-*.arrow` files of a Hugging Face `save_to_disk` folder, stream or file format)
one record batch at a time, and only the text column is read: memory is bounded by a
row group, not by the file. Every non-null, non-empty row of the column is one document.
A `save_to_disk` folder's dataset is the Arrow files its `state.json` lists.

pyarrow is imported lazily (the `arrow` extra). Every problem with a file is a one-line
`DataError` naming it: a missing column (listing the columns there are), a column that
does not hold strings, a corrupt or truncated file, text that is not UTF-8.
"""
import contextlib
import json
import os
from typing import Iterator

from vesperjax.data import errors

SUFFIX_KINDS = {".parquet": "parquet", ".arrow": "arrow"}
KINDS = tuple(SUFFIX_KINDS.values())
_KIND_NAMES = {"parquet": "Parquet", "arrow": "Arrow"}
_ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format starts (and ends) with it
# An IPC stream ends with an end-of-stream marker, a continuation token and a zero length:
# a stream cut between two messages reads as complete without this check. (Streams from
# before Arrow 0.15 end with a zero length alone: indistinguishable from a stream cut in
# a buffer's zero padding, so they are refused.)
_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"
# Hugging Face `datasets` save_to_disk: a folder's state.json lists its Arrow files;
# dataset_dict.json marks a folder whose splits are subfolders.
HF_STATE, HF_DATASET_DICT = "state.json", "dataset_dict.json"
_LISTED_COLUMNS = 20  # how many column names an error about a missing column lists


def pyarrow():
  """The pyarrow module with its parquet and ipc submodules loaded; a one-line DataError
  naming the extra to install when it is missing."""
  try:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.ipc  # pylint: disable=g-import-not-at-top,unused-import
    import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise errors.DataError("reading Parquet or Arrow files needs pyarrow: "
                           "pip install 'vesperjax[arrow]'") from None
  return pa


def check(path: str, kind: str, column: str) -> None:
  """Raise a DataError naming `path` unless its metadata opens and `column` holds strings:
  run over every file before reading any, so a bad shard fails before the build."""
  with _reading(path, kind):
    with _opened(path, kind) as (schema, _):
      _check_column(path, schema, column)


def rows(path: str, kind: str, column: str) -> Iterator[tuple[int, str]]:
  """(row index in the file, text) of every non-null, non-empty row of `column`, read a
  row group (Parquet) or record batch (Arrow) at a time."""
  with _reading(path, kind):
    with _opened(path, kind) as (schema, batches):
      _check_column(path, schema, column)
      first_row = 0
      for batch in batches(column):
        for chunk in _chunks(batch.column(column)):
          for i, text in enumerate(chunk.to_pylist(), first_row):
            if text:
              yield i, text
          first_row += len(chunk)


def text_bytes(path: str, kind: str, column: str) -> int:
  """About how many bytes of text `column` holds: Parquet's uncompressed size of the
  column chunks, an Arrow file's size. For the progress bar, not for correctness."""
  if kind != "parquet":
    return os.path.getsize(path)
  try:
    with _reading(path, kind):
      meta = pyarrow().parquet.read_metadata(path)
      total = 0
      for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
          if group.column(c).path_in_schema == column:
            total += group.column(c).total_uncompressed_size
      return total
  except errors.DataError:
    return os.path.getsize(path)  # the read that follows reports the problem


def saved_dataset_files(folder: str, filenames: list[str]) -> list[str] | None:
  """The Arrow files of a Hugging Face `save_to_disk` folder, as its `state.json` lists
  them (other .arrow files there, such as `map()` caches, are not the dataset); None when
  `filenames` (the folder's) hold no such state.json. A listed file that is missing is
  an error."""
  if HF_STATE not in filenames:
    return None
  state_path = os.path.join(folder, HF_STATE)
  try:
    with open(state_path, encoding="utf-8") as f:
      state = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  data_files = state.get("_data_files") if isinstance(state, dict) else None
  if not isinstance(data_files, list):
    return None
  names = []
  for entry in data_files:
    name = entry.get("filename") if isinstance(entry, dict) else None
    if not isinstance(name, str) or os.sep in name or name.startswith("."):
      raise errors.MalformedRecordError(f"{state_path}: bad _data_files entry {entry!r}")
    if not os.path.isfile(os.path.join(folder, name)):
      raise errors.MissingPathError(f"{state_path}: lists {name}, which is missing")
    names.append(name)
  return names


@contextlib.contextmanager
def _reading(path: str, kind: str):
  """pyarrow's errors about the file as one-line DataErrors that name it."""
  pa = pyarrow()
  try:
    yield
  except FileNotFoundError:
    raise errors.MissingPathError(f"{path}: no such file") from None
  except UnicodeDecodeError as e:
    raise errors.DecodeError(
        f"{path}: text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
  except (pa.ArrowException, OSError) as e:
    raise errors.DecodeError(f"{path}: corrupt or truncated {_KIND_NAMES[kind]} file "
                             f"({_first_line(e)})") from None


@contextlib.contextmanager
def _opened(path: str, kind: str):
  """(schema, batches) of an open file; `batches(column)` yields that column's tables or
  record batches in file order, one row group or record batch at a time."""
  pa = pyarrow()
  if kind == "parquet":
    # pages written with a CRC (write_page_checksum=True) are verified; others cannot be
    with pa.parquet.ParquetFile(path, page_checksum_verification=True) as pf:

      def row_groups(column):
        for g in range(pf.num_row_groups):
          yield pf.read_row_group(g, columns=[column])

      yield pf.schema_arrow, row_groups
    return
  with open(path, "rb") as fh:
    head = fh.read(len(_ARROW_FILE_MAGIC))
  with pa.OSFile(path) as f:  # reads what it is asked for: no whole-file map
    if head == _ARROW_FILE_MAGIC:
      reader = pa.ipc.open_file(f)

      def file_batches(_):
        for b in range(reader.num_record_batches):
          yield reader.get_batch(b)

      yield reader.schema, file_batches
      return
    _check_stream_end(path)
    reader = pa.ipc.open_stream(f)
    yield reader.schema, lambda _: iter(reader)


def _check_stream_end(path: str) -> None:
  size = os.path.getsize(path)
  with open(path, "rb") as fh:
    fh.seek(max(0, size - len(_STREAM_END)))
    tail = fh.read()
  if tail != _STREAM_END:
    raise errors.DecodeError(f"{path}: truncated Arrow stream (no end-of-stream marker)")


def _check_column(path: str, schema, column: str) -> None:
  pa = pyarrow()
  names = schema.names
  if column not in names:
    shown = ", ".join(names[:_LISTED_COLUMNS])
    more = f" and {len(names) - _LISTED_COLUMNS} more" if len(names) > _LISTED_COLUMNS else ""
    raise errors.MalformedRecordError(
        f"{path}: no column {column!r} (columns: {shown or 'none'}{more}); "
        "choose one with data.text_field (--text-field)")
  if names.count(column) > 1:
    raise errors.MalformedRecordError(f"{path}: {names.count(column)} columns are named "
                                      f"{column!r}")
  kind = schema.field(column).type
  if pa.types.is_dictionary(kind):
    kind = kind.value_type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
          or pa.types.is_string_view(kind)):
    raise errors.MalformedRecordError(
        f"{path}: column {column!r} holds {kind}, not strings")


def _chunks(column):
  """The arrays of a table's ChunkedArray, or a record batch's one array."""
  return column.chunks if hasattr(column, "chunks") else [column]


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__
