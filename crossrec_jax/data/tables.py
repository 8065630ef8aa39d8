"""Bring-your-own files (CSV / JSONL / Parquet) -> columns of strings, with each row's place.

Files are parsed as files, never split with ``str.splitlines()``: a quoted newline stays in its
CSV field and U+2028, U+0085 or a form feed inside a field are data. CSV is read by pyarrow
(C++, multi-megabyte blocks, any field length); JSONL one physical ``\\n``-terminated line at a
time; Parquet by pyarrow. Every column comes back as strings so one validation path serves all
formats; values that cannot be a field (a JSON object or list, a boolean) are recorded as
``problems`` per column and row, and rows that could not be split into fields (invalid JSON, too
many CSV fields) as ``malformed``. Places are 1-based physical lines for CSV/JSONL ("file:line
N"; a record with a quoted newline is named by its first line) and 0-based rows for Parquet.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

FORMATS = (".csv", ".jsonl", ".parquet")


class DataError(ValueError):
  """Malformed input data; the message names file, row and field."""


class Places:
  """Row index -> 'file:line N' (or 'file:row N'), computed only when a message needs one."""

  def __init__(self, path: pathlib.Path, lines: np.ndarray | None = None, kind: str = "line",
               locate=None):
    self.path, self._lines, self.kind, self._locate = path, lines, kind, locate

  def __call__(self, row: int) -> str:
    if self.kind == "row":
      return f"{self.path}:row {row}"
    if self._lines is None:
      self._lines = self._locate()
    return f"{self.path}:line {int(self._lines[row])}"


class Table:
  """A parsed file: ``columns`` name -> pyarrow string array (no nulls), one entry per row."""

  def __init__(self, path, names, columns, places, num_rows, malformed=(), problems=None):
    self.path, self.names, self.columns, self.place = path, list(names), columns, places
    self.num_rows = num_rows
    self.malformed: list[tuple[str, str]] = list(malformed)  # (place, why it has no fields)
    self.problems: dict[str, dict[int, str]] = problems or {}  # column -> row -> what is wrong

  def column(self, name: str) -> pa.Array:
    if name in self.columns:
      return self.columns[name]
    return pa.array([""] * self.num_rows, pa.string())


def _progress(path, total=None, unit="row"):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  # disable=None: a bar on a terminal, nothing in a log file (the reader logs a summary instead).
  return tqdm(total=total, desc=f"reading {path.name}", unit=unit, unit_scale=True,
              file=sys.stderr, disable=None, leave=False)


def read_table(path: pathlib.Path) -> Table:
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file does not exist")
  if path.stat().st_size == 0:
    raise DataError(f"{path}: file is empty")
  suffix = path.suffix.lower()
  if suffix == ".csv":
    return _read_csv(path)
  if suffix == ".jsonl":
    return _read_jsonl(path)
  if suffix == ".parquet":
    return _read_parquet(path)
  raise DataError(f"{path}: unsupported format {suffix!r}; use one of {FORMATS}")


def _check_utf8(path: pathlib.Path, data: bytes):
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:line {line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                    "re-encode the file as UTF-8") from e


def _read_csv(path: pathlib.Path) -> Table:
  data = path.read_bytes()
  _check_utf8(path, data)
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]  # a UTF-8 byte order mark is not part of the first column's name
  if not data.strip():
    raise DataError(f"{path}: file is empty")
  header = next(csv.reader([data.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")]), [])
  names = [n.strip() for n in header]
  if len(set(names)) != len(names) or not all(names):
    raise DataError(f"{path}:line 1: the header {header} has an empty or repeated column name")
  bad_records: dict[int, str] = {}

  def invalid(row):  # wrong number of fields: count it, keep reading
    if row.number is None:
      return "error"
    record = row.number - 2  # pyarrow numbers records from 1, the header being 1
    what = "more" if row.actual_columns > row.expected_columns else "fewer"
    bad_records[record] = (f"{what} fields than the header's {len(names)} "
                           f"({row.actual_columns} found)")
    return "skip"

  try:
    reader = pa_csv.open_csv(
        pa.BufferReader(data),
        read_options=pa_csv.ReadOptions(use_threads=False, block_size=1 << 22, column_names=names,
                                        skip_rows=1),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid),
        convert_options=pa_csv.ConvertOptions(column_types={n: pa.string() for n in names},
                                              strings_can_be_null=False,
                                              quoted_strings_can_be_null=False))
    batches = []
    with _progress(path) as bar:
      for batch in reader:
        batches.append(batch)
        bar.update(batch.num_rows)
  except pa.ArrowInvalid as e:
    raise DataError(f"{path}: not a readable CSV file ({e})") from e
  table = pa.Table.from_batches(batches, schema=reader.schema)
  n_records = table.num_rows + len(bad_records)
  if data.count(b'"') % 2:  # an unclosed quote swallows the rest of the file into one field
    start = _record_lines(data, n_records)[-1] if n_records else 1
    raise DataError(f"{path}:line {start}: a quoted field is never closed (the file has an odd "
                    "number of '\"'); close the quote, or write a quote inside a field as \"\"")
  good = np.ones(n_records, bool)
  good[list(bad_records)] = False
  record_of_row = np.flatnonzero(good)
  # Records are one line each after the header unless a field holds a newline or a line is
  # blank; then a second pass with the csv module finds the lines, only when a message needs one.
  n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
  simple = n_lines == n_records + 1 and data.count(b"\r") == data.count(b"\r\n")
  cache = {}

  def record_lines():
    if "lines" not in cache:
      cache["lines"] = (np.arange(n_records) + 2 if simple else _record_lines(data, n_records))
    return cache["lines"]
  places = Places(path, record_lines()[record_of_row] if simple else None,
                  locate=lambda: record_lines()[record_of_row])
  malformed = [(f"{path}:line {record_lines()[r]}", m) for r, m in sorted(bad_records.items())]
  columns = {n: pc.fill_null(table.column(n).combine_chunks(), "") for n in names}
  return Table(path, names, columns, places, table.num_rows, malformed)


def _record_lines(data: bytes, n_records: int) -> np.ndarray:
  """First physical line of each non-blank CSV record (1-based), like pyarrow counts records."""
  import io  # pylint: disable=import-outside-toplevel
  csv.field_size_limit(sys.maxsize)
  reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
  next(reader, None)  # header
  lines, end = [], reader.line_num
  for row in reader:
    if row:  # pyarrow skips empty lines only
      lines.append(end + 1)
    end = reader.line_num
  lines += [end + 1] * (n_records - len(lines))  # parsers disagree: never fail on a message
  return np.asarray(lines[:n_records])


def _json_value(value) -> tuple[str, str | None]:
  """A JSON value -> (string, problem)."""
  if value is None:
    return "", None
  if isinstance(value, bool):
    return str(value).lower(), "is a boolean (true/false), not a value of this field"
  if isinstance(value, str):
    return value, None
  if isinstance(value, (int, float)):
    return (repr(value) if isinstance(value, float) else str(value)), None
  kind = "an object" if isinstance(value, dict) else "a list"
  return _nested_text(value), f"holds {kind}; IDs, labels and positions are single values"


def _nested_text(value) -> str:
  """A list as 'a|b' (the tags form; text columns keep the words), an object as JSON."""
  if isinstance(value, (list, tuple)):
    return "|".join(_nested_text(v) for v in value)
  return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_jsonl(path: pathlib.Path) -> Table:
  values: dict[str, list[str]] = {}
  problems: dict[str, dict[int, str]] = {}
  lines, malformed_records = [], []
  n = 0
  # Binary iteration splits on b"\n" only; JSON strings cannot hold a raw newline, while
  # U+2028 / U+0085 inside a string are legal JSON and stay data.
  with path.open("rb") as f, _progress(path) as bar:
    for number, raw in enumerate(f, 1):
      bar.update(1)
      try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM is not JSON
      except UnicodeDecodeError as e:
        raise DataError(f"{path}:line {number}: not valid UTF-8 ({e.reason}); re-encode the "
                        "file as UTF-8") from e
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        malformed_records.append((f"{path}:line {number}", f"invalid JSON ({e.msg})"))
        continue
      if not isinstance(row, dict):
        malformed_records.append((f"{path}:line {number}", "a JSON object per line is expected"))
        continue
      for name, value in row.items():
        column = values.get(name)
        if column is None:
          column = values[name] = [""] * n
        string, problem = _json_value(value)
        column.append(string)
        if problem:
          problems.setdefault(name, {})[n] = problem
      for name, column in values.items():
        if len(column) == n:
          column.append("")  # absent in this row
      lines.append(number)
      n += 1
  if n == 0 and not malformed_records:
    raise DataError(f"{path}: file is empty")
  columns = {k: pa.array(v, pa.string()) for k, v in values.items()}
  return Table(path, list(values), columns, Places(path, np.asarray(lines)), n,
               malformed_records, problems)


def _read_parquet(path: pathlib.Path) -> Table:
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  try:
    table = pq.read_table(path)
  except Exception as e:  # pyarrow raises several types for corrupt files
    raise DataError(f"{path}: not a readable Parquet file ({e})") from e
  columns, problems = {}, {}
  for name in table.column_names:
    column = table.column(name).combine_chunks()
    kind = column.type
    if pa.types.is_boolean(kind):
      problems[name] = {i: "is a boolean (true/false), not a value of this field"
                        for i in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))}
      column = pc.cast(column, pa.string())
    elif pa.types.is_nested(kind):
      what = "an object" if pa.types.is_struct(kind) or pa.types.is_map(kind) else "a list"
      problems[name] = {i: f"holds {what}; IDs, labels and positions are single values"
                        for i in np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))}
      column = pa.array(["" if v is None else _nested_text(v) for v in column.to_pylist()],
                        pa.string())
    elif pa.types.is_timestamp(kind) or pa.types.is_date(kind):
      # A datetime column orders like its epoch value (timestamp/position only need order).
      column = pc.cast(pc.cast(column, pa.timestamp("us")) if pa.types.is_date(kind) else column,
                       pa.int64())
      column = pc.cast(column, pa.string())
    elif pa.types.is_floating(kind):
      # repr keeps 'nan' / 'inf' recognisable and integers-as-floats readable.
      column = pa.array(["" if v is None else repr(v) if not (isinstance(v, float) and
                        v.is_integer() and math.isfinite(v)) else str(int(v))
                         for v in column.to_pylist()], pa.string())
    else:
      try:
        column = pc.cast(column, pa.string())
      except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        column = pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())
    columns[name] = pc.fill_null(column, "")
  return Table(path, table.column_names, columns, Places(path, kind="row"), table.num_rows,
               problems=problems)
