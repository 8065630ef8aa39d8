"""Reading and validating raw interactions and items (bring-your-own CSV / JSONL / Parquet).

Every error names the file, the row (1-based line for CSV/JSONL, 0-based row for Parquet),
the field and what to do. With ``bad_rows="skip"`` malformed rows are dropped and counted in
a ``ValidationReport`` instead. Files are parsed by ``tables`` (no line splitting of text);
interaction rows are validated column-wise (pyarrow / numpy), labels by ``labels``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crossrec_jax.data import labels as labels_lib
from crossrec_jax.data.tables import FORMATS, DataError, Places, read_table

SPLITS = ("train", "valid", "test", "history")
INTERACTION_COLUMNS = ("user_id", "domain", "item_id", "label")
ID_COLUMNS = ("user_id", "domain", "item_id")
ITEM_COLUMNS = ("item_id", "domain")
TAGS_COLUMN = "tags"
__all__ = ["DataError", "FORMATS", "Interaction", "Item", "ValidationReport", "find_table",
           "iter_rows", "read_items", "read_interactions", "check_against_items"]
log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Interaction:
  user_id: str
  domain: str
  item_id: str
  label: float
  order: float          # timestamp or position (file order when absent)
  split: str | None = None
  where: Any = ""       # 'file:line N', or a Places resolved only when a message needs it
  row: int = -1
  user_tags: tuple[str, ...] = ()  # the user's categorical side features (e.g. demographics)

  @property
  def place(self) -> str:
    return self.where(self.row) if isinstance(self.where, Places) else self.where


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
  duplicates: dict[str, int] = dataclasses.field(default_factory=dict)  # domain -> rows dropped

  def add(self, reason: str, message: str):
    self.skipped[reason] += 1
    if len(self.examples) < 20:
      self.examples.append(message)

  @property
  def total(self) -> int:
    return sum(self.skipped.values())

  def to_dict(self) -> dict[str, Any]:
    return {"skipped_rows": self.total, "by_reason": dict(self.skipped), "examples": self.examples,
            "duplicates_dropped": dict(self.duplicates)}

  def to_metadata(self) -> dict[str, Any]:
    """What the prepared data set stores: counts and the places of the first skipped rows, not
    the messages, which can quote field values such as raw user IDs."""
    return {k: v for k, v in self.to_dict().items() if k != "examples"} | {
        "places": [m.split(": ", 1)[0] for m in self.examples]}

  def log_summary(self, what: str):
    if self.total:
      reasons = ", ".join(f"{k} {v}" for k, v in self.skipped.most_common())
      log.warning("%s: skipped %d bad row(s) (bad_rows='skip'): %s; first: %s", what, self.total,
                  reasons, self.examples[0])


class RowPolicy:
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
  """(column names, iterator of (place, row dict of strings)); malformed rows come first with
  an ``__error__`` entry."""
  table = read_table(path)
  columns = {n: table.columns[n].to_pylist() for n in table.names}

  def rows():
    for place, message in table.malformed:
      yield place, {"__error__": message}
    for i in range(table.num_rows):
      yield table.place(i), {n: columns[n][i] for n in table.names}
  return table.names, rows()


def _require_columns(path, names, required):
  missing = [c for c in required if c not in names]
  if missing:
    raise DataError(f"{path}: missing column(s) {missing}; found {list(names)}. Required: "
                    f"{list(required)}")


def _report_malformed(table, policy):
  for place, message in table.malformed:
    policy.bad("malformed_row", f"{place}: {message}")


def _id_problem(value: str, raw: str | None) -> str | None:
  if raw:
    return raw
  if not value:
    return "is empty (or whitespace only)"
  if "\x00" in value:
    return "contains a NUL character"
  return None


def read_items(path: pathlib.Path, *, bad_rows: str = "fail",
               report: ValidationReport | None = None) -> dict[tuple[str, str], Item]:
  """Items keyed by (domain, item_id). Text = the non-empty text columns joined with '. ';
  a ``tags`` column ('|'-separated, e.g. genres) is read as categorical side features."""
  policy = RowPolicy(bad_rows, report or ValidationReport())
  table = read_table(path)
  _require_columns(path, table.names, ITEM_COLUMNS)
  _report_malformed(table, policy)
  text_columns = [n for n in table.names if n not in ITEM_COLUMNS and n != TAGS_COLUMN]
  cols = {n: pc.utf8_trim_whitespace(table.column(n)).to_pylist()
          for n in (*ITEM_COLUMNS, TAGS_COLUMN, *text_columns)}
  problems = {n: table.problems.get(n, {}) for n in (*ITEM_COLUMNS, TAGS_COLUMN)}
  items: dict[tuple[str, str], Item] = {}
  for i in range(table.num_rows):
    item_id, domain = cols["item_id"][i], cols["domain"][i]
    bad = next(((c, p) for c in ITEM_COLUMNS
                if (p := _id_problem(cols[c][i], problems[c].get(i)))), None)
    if bad:
      policy.bad("empty_id" if bad[1].startswith("is empty") else "bad_id",
                 f"{table.place(i)}: field {bad[0]} {bad[1]}")
      continue
    text = ". ".join(t for t in (cols[c][i] for c in text_columns) if t)
    key = (domain, item_id)
    if key in items and items[key].text != text:
      policy.bad("conflicting_item", f"{table.place(i)}: item {item_id!r} of domain {domain!r} "
                 f"appears again with different text ({items[key].text[:40]!r} vs "
                 f"{text[:40]!r}); keep one row per item")
      continue
    tags = tuple(t.strip() for t in cols[TAGS_COLUMN][i].split("|") if t.strip())
    items[key] = Item(item_id, domain, text, tags)
  if not items:
    raise DataError(f"{path}: no valid item rows")
  return items


def _numbers(column: pa.Array) -> np.ndarray:
  """Strings -> float64, NaN where a value is not a number ('1_000', '', 'five')."""
  try:
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
  except pa.ArrowInvalid:  # some value is not a number: parse one by one (error path only)
    return np.array([labels_lib.parse_number(v) for v in column.to_pylist()], np.float64)


def read_interactions(path: pathlib.Path, *, bad_rows: str = "fail",
                      report: ValidationReport | None = None,
                      rating_scales: dict[str, tuple[float, float]] | None = None,
                      domain_tasks: dict[str, str] | None = None) -> list[Interaction]:
  """Interactions in file order. ``rating_scales`` (domain -> (min, max)) and ``domain_tasks``
  (domain -> 'rating' | 'implicit') are declarations; undeclared domains are inferred from
  clean labels only (see ``labels.check_labels``)."""
  start = time.perf_counter()
  report = report if report is not None else ValidationReport()
  policy = RowPolicy(bad_rows, report)
  table = read_table(path)
  _require_columns(path, table.names, INTERACTION_COLUMNS)
  _report_malformed(table, policy)
  n = table.num_rows
  order_column = next((c for c in ("timestamp", "position") if c in table.names), None)
  ids = {c: pc.utf8_trim_whitespace(table.column(c)) for c in ID_COLUMNS}
  label_text = pc.utf8_trim_whitespace(table.column("label"))
  label = _numbers(label_text)
  order = (_numbers(pc.utf8_trim_whitespace(table.column(order_column))) if order_column
           else np.arange(n, dtype=np.float64))
  split_text = pc.utf8_trim_whitespace(table.column("split"))

  # Each row's first problem, checked in this order; messages are built for bad rows only.
  checks: list[tuple[str, str, np.ndarray]] = []
  for c in ID_COLUMNS:
    raw = np.zeros(n, bool)
    raw[list(table.problems.get(c, {}))] = True
    empty = pc.equal(pc.utf8_length(ids[c]), 0).to_numpy(zero_copy_only=False)
    nul = pc.match_substring(ids[c], "\x00").to_numpy(zero_copy_only=False)
    checks.append(("bad_id", c, raw | nul))
    checks.append(("empty_id", c, empty))
  raw_label = np.zeros(n, bool)
  raw_label[list(table.problems.get("label", {}))] = True
  checks.append(("bad_label", "label", raw_label | ~np.isfinite(label)))
  if order_column:
    raw_order = np.zeros(n, bool)
    raw_order[list(table.problems.get(order_column, {}))] = True
    checks.append(("bad_order", order_column, raw_order | ~np.isfinite(order)))
  split_ok = pc.is_in(split_text, value_set=pa.array(("",) + SPLITS)).to_numpy(zero_copy_only=False)
  checks.append(("bad_split", "split", ~split_ok))
  first = np.full(n, -1)
  for k, (_, _, mask) in enumerate(checks):
    first[(first < 0) & mask] = k

  def message(k, i):
    reason, field, _ = checks[k]
    if reason in ("bad_id", "empty_id"):
      value = table.columns[field][i].as_py()
      return f"field {field} " + (table.problems.get(field, {}).get(i) or
                                  _id_problem(value.strip(), None) or f"{value!r} is invalid")
    problem = table.problems.get(field, {}).get(i)
    value = (label_text if field == "label" else table.column(field))[i].as_py()
    if problem:
      return f"field {field} {value} {problem}"
    if field == "split":
      return f"field split {value!r} is not one of {SPLITS}"
    if not value.strip():
      return f"field {field} is empty"
    return f"field {field} {value!r} is not a finite number"

  for i in np.flatnonzero(first >= 0):
    policy.bad(checks[first[i]][0], f"{table.place(int(i))}: {message(first[i], i)}")
  keep = first < 0
  keep &= labels_lib.check_labels(path, ids["domain"], label, keep, table.place, policy,
                                  rating_scales or {}, domain_tasks or {})
  rows = np.flatnonzero(keep)
  take = pa.array(rows)
  users, domains, items = (_shared_strings(ids[c].take(take)) for c in ID_COLUMNS)
  splits = [s or None for s in _shared_strings(split_text.take(take))]
  out = list(map(Interaction, users, domains, items, label[rows].tolist(), order[rows].tolist(),
                 splits, [table.place] * len(rows), rows.tolist()))
  if not out:
    raise DataError(f"{path}: no valid interaction rows")
  log.info("%s: read %d rows (%d kept) in %.1f s", path, n + len(table.malformed), len(out),
           time.perf_counter() - start)
  return out


def _shared_strings(column: pa.Array) -> list[str]:
  """``column.to_pylist()``, with one str object per distinct value: IDs and domains repeat, and
  a shared str is hashed once for every dict and set it meets downstream, not once per row."""
  encoded = pc.dictionary_encode(column)
  distinct = encoded.dictionary.to_pylist()
  return list(map(distinct.__getitem__, encoded.indices.to_numpy(zero_copy_only=False).tolist()))


def check_against_items(interactions: list[Interaction], items: dict[tuple[str, str], Item],
                        items_path, *, bad_rows: str = "fail",
                        report: ValidationReport | None = None) -> list[Interaction]:
  """Unknown domains and items in interactions vs the item table."""
  policy = RowPolicy(bad_rows, report or ValidationReport())
  item_domains = {d for d, _ in items}
  kept = []
  for x in interactions:
    if (x.domain, x.item_id) in items:
      kept.append(x)
    elif x.domain not in item_domains:
      policy.bad("unknown_domain", f"{x.place}: field domain {x.domain!r} is not a domain of "
                 f"{items_path} (known: {sorted(item_domains)})")
    else:
      policy.bad("unknown_item", f"{x.place}: field item_id {x.item_id!r} of domain "
                 f"{x.domain!r} is missing from {items_path}")
  return kept
