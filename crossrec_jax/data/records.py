"""Reading and validating raw interactions and items (bring-your-own CSV / JSONL / Parquet).

Every error names the file, the row (1-based line for CSV/JSONL, 0-based row for Parquet),
the field and what to do. With ``bad_rows="skip"`` malformed rows are dropped and counted in
a ``ValidationReport`` instead.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import pathlib
from typing import Any, Iterator

SPLITS = ("train", "valid", "test", "history")
INTERACTION_COLUMNS = ("user_id", "domain", "item_id", "label")
ITEM_COLUMNS = ("item_id", "domain")
TAGS_COLUMN = "tags"
FORMATS = (".csv", ".jsonl", ".parquet")


class DataError(ValueError):
  """Malformed input data; the message names file, row and field."""


@dataclasses.dataclass
class Interaction:
  user_id: str
  domain: str
  item_id: str
  label: float
  order: float          # timestamp or position (file order when absent)
  split: str | None = None
  place: str = ""       # file:line, for error messages


@dataclasses.dataclass
class Item:
  item_id: str
  domain: str
  text: str
  tags: tuple[str, ...] = ()   # categorical side features (genres, categories), not text


@dataclasses.dataclass
class ValidationReport:
  """Rows skipped under ``bad_rows='skip'``: counts per reason plus the first few places."""
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: list[str] = dataclasses.field(default_factory=list)

  def add(self, reason: str, message: str):
    self.skipped[reason] += 1
    if len(self.examples) < 20:
      self.examples.append(message)

  @property
  def total(self) -> int:
    return sum(self.skipped.values())

  def to_dict(self) -> dict[str, Any]:
    return {"skipped_rows": self.total, "by_reason": dict(self.skipped), "examples": self.examples}


class _RowPolicy:
  def __init__(self, bad_rows: str, report: ValidationReport):
    if bad_rows not in ("fail", "skip"):
      raise ValueError(f"bad_rows must be 'fail' or 'skip', got {bad_rows!r}")
    self.bad_rows, self.report = bad_rows, report

  def bad(self, reason: str, message: str):
    if self.bad_rows == "fail":
      raise DataError(message + " (set bad_rows='skip' to drop such rows and count them)")
    self.report.add(reason, message)


def find_table(directory: pathlib.Path, stem: str) -> pathlib.Path:
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise DataError(f"{directory}: data directory does not exist")
  found = [directory / f"{stem}{ext}" for ext in FORMATS if (directory / f"{stem}{ext}").is_file()]
  if not found:
    raise DataError(f"{directory}: no {stem}.csv, {stem}.jsonl or {stem}.parquet found; "
                    f"the bring-your-own layout needs {stem}.{{csv,jsonl,parquet}}")
  if len(found) > 1:
    raise DataError(f"{directory}: several {stem} files ({', '.join(p.name for p in found)}); keep one")
  return found[0]


def iter_rows(path: pathlib.Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
  """(column names, iterator of (place, row dict)); ``place`` is 'file:line N' / 'file:row N'."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: file does not exist")
  if path.stat().st_size == 0:
    raise DataError(f"{path}: file is empty")
  suffix = path.suffix.lower()
  if suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    try:
      table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
      raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    names = table.column_names
    rows = table.to_pylist()
    return names, ((f"{path}:row {i}", r) for i, r in enumerate(rows))
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    line = path.read_bytes()[:e.start].count(b"\n") + 1
    raise DataError(f"{path}:line {line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                    "re-encode the file as UTF-8") from e
  if not text.strip():
    raise DataError(f"{path}: file is empty")
  if suffix == ".csv":
    reader = csv.DictReader(text.splitlines())
    names = [n.strip() for n in (reader.fieldnames or [])]
    reader.fieldnames = names

    def csv_rows():
      for row in reader:
        if None in row:  # more fields than the header has
          yield f"{path}:line {reader.line_num}", {"__extra__": row.pop(None), **row}
        else:
          yield f"{path}:line {reader.line_num}", row
    return names, csv_rows()
  if suffix == ".jsonl":
    lines = text.splitlines()

    def json_rows():
      for i, line in enumerate(lines, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          yield f"{path}:line {i}", {"__error__": f"invalid JSON ({e.msg})"}
          continue
        if not isinstance(row, dict):
          yield f"{path}:line {i}", {"__error__": "a JSON object per line is expected"}
          continue
        yield f"{path}:line {i}", row
    first = next((json.loads(l) for l in lines if l.strip() and _is_json_object(l)), {})
    return list(first), json_rows()
  raise DataError(f"{path}: unsupported format {suffix!r}; use one of {FORMATS}")


def _is_json_object(line: str) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except json.JSONDecodeError:
    return False


def _require_columns(path, names, required):
  missing = [c for c in required if c not in names]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {list(names)}. Required: "
                    f"{list(required)}")


def _malformed(row, place, names, policy) -> bool:
  """Rows the reader could not split into fields (bad JSON, too many CSV fields)."""
  if "__error__" in row:
    policy.bad("malformed_row", f"{place}: {row['__error__']}")
    return True
  if "__extra__" in row:
    policy.bad("malformed_row", f"{place}: more fields than the header's {len(names)}")
    return True
  return False


def _text(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return str(value).strip()


def read_items(path: pathlib.Path, *, bad_rows: str = "fail",
               report: ValidationReport | None = None) -> dict[tuple[str, str], Item]:
  """Items keyed by (domain, item_id). Text = the non-empty text columns joined with '. ';
  a ``tags`` column ('|'-separated, e.g. genres) is read as categorical side features."""
  policy = _RowPolicy(bad_rows, report or ValidationReport())
  names, rows = iter_rows(path)
  _require_columns(path, names, ITEM_COLUMNS)
  text_columns = [n for n in names if n not in ITEM_COLUMNS and n != TAGS_COLUMN]
  items: dict[tuple[str, str], Item] = {}
  for place, row in rows:
    if _malformed(row, place, names, policy):
      continue
    item_id, domain = _text(row.get("item_id")), _text(row.get("domain"))
    if not item_id or not domain:
      policy.bad("empty_id", f"{place}: field {'item_id' if not item_id else 'domain'} is empty")
      continue
    text = ". ".join(t for t in (_text(row.get(c)) for c in text_columns) if t)
    key = (domain, item_id)
    if key in items and items[key].text != text:
      policy.bad("conflicting_item", f"{place}: item {item_id!r} of domain {domain!r} appears "
                 f"again with different text ({items[key].text[:40]!r} vs {text[:40]!r}); "
                 "keep one row per item")
      continue
    tags = tuple(t.strip() for t in _text(row.get(TAGS_COLUMN)).split("|") if t.strip())
    items[key] = Item(item_id, domain, text, tags)
  if not items:
    raise DataError(f"{path}: no valid item rows")
  return items


def read_interactions(path: pathlib.Path, *, bad_rows: str = "fail",
                      report: ValidationReport | None = None,
                      rating_scales: dict[str, tuple[float, float]] | None = None) -> list[Interaction]:
  """Interactions in file order. ``rating_scales`` (domain -> (min, max)) checks explicit labels."""
  policy = _RowPolicy(bad_rows, report or ValidationReport())
  names, rows = iter_rows(path)
  _require_columns(path, names, INTERACTION_COLUMNS)
  order_column = next((c for c in ("timestamp", "position") if c in names), None)
  out: list[Interaction] = []
  for n, (place, row) in enumerate(rows):
    if _malformed(row, place, names, policy):
      continue
    ids = {c: _text(row.get(c)) for c in ("user_id", "domain", "item_id")}
    empty = [c for c, v in ids.items() if not v]
    if empty:
      policy.bad("empty_id", f"{place}: field {empty[0]} is empty")
      continue
    try:
      label = float(row.get("label"))
      if not math.isfinite(label):
        raise ValueError
    except (TypeError, ValueError):
      policy.bad("bad_label", f"{place}: field label {row.get('label')!r} is not a finite number")
      continue
    scale = (rating_scales or {}).get(ids["domain"])
    if scale and not scale[0] <= label <= scale[1]:
      policy.bad("label_out_of_scale", f"{place}: field label {label:g} is outside domain "
                 f"{ids['domain']!r}'s rating scale [{scale[0]:g}, {scale[1]:g}]")
      continue
    order = float(n)
    if order_column:
      try:
        order = float(row.get(order_column))
      except (TypeError, ValueError):
        policy.bad("bad_order", f"{place}: field {order_column} {row.get(order_column)!r} is "
                   "not a number")
        continue
    split = _text(row.get("split")) or None
    if split is not None and split not in SPLITS:
      policy.bad("bad_split", f"{place}: field split {split!r} is not one of {SPLITS}")
      continue
    out.append(Interaction(ids["user_id"], ids["domain"], ids["item_id"], label, order, split,
                           place))
  if not out:
    raise DataError(f"{path}: no valid interaction rows")
  return out


def check_against_items(interactions: list[Interaction], items: dict[tuple[str, str], Item],
                        items_path, *, bad_rows: str = "fail",
                        report: ValidationReport | None = None) -> list[Interaction]:
  """Unknown domains and items in interactions vs the item table."""
  policy = _RowPolicy(bad_rows, report or ValidationReport())
  item_domains = {d for d, _ in items}
  kept = []
  for x in interactions:
    if x.domain not in item_domains:
      policy.bad("unknown_domain", f"{x.place}: field domain {x.domain!r} is not a domain of "
                 f"{items_path} (known: {sorted(item_domains)})")
      continue
    if (x.domain, x.item_id) not in items:
      policy.bad("unknown_item", f"{x.place}: field item_id {x.item_id!r} of domain "
                 f"{x.domain!r} is missing from {items_path}")
      continue
    kept.append(x)
  return kept
