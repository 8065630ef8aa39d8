"""Labels and rating scales: declared per domain (``data.rating_scales``, ``data.domain_tasks``)
or inferred from clean labels only.

Without a declaration a domain whose labels are all 0/1 is implicit, any other is explicit with
the scale [floor(min), ceil(max)] of its labels, after refusing what would distort it: negative
labels, a label far above the rest (one 50 in a 1-5 domain would otherwise stretch the scale to
[1, 50]), and 0/1 clicks mixed with ratings above 1 in one domain (ambiguous: declare the task).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crossrec_jax.data.tables import DataError

TASKS = ("rating", "implicit")
# A decimal number as people write it in data files; not Python's '1_000', not hex, not 'true'.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.I)
_MIN_ROWS_FOR_OUTLIERS = 10  # below this, a high label cannot be told from a sparse scale


def parse_number(value) -> float:
  """A number from a string, or NaN (callers report NaN as 'not a finite number')."""
  text = str(value).strip()
  return float(text) if _NUMBER.fullmatch(text) else math.nan


def parse_rating_scales(spec) -> tuple[tuple[str, float, float], ...]:
  """``"books=1:5,movies=0.5:5"`` (the config / CLI form), a dict or (domain, lo, hi) tuples."""
  if not spec:
    return ()
  if isinstance(spec, str):
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
      domain, _, scale = part.partition("=")
      lo, _, hi = scale.partition(":")
      lo_v, hi_v = parse_number(lo), parse_number(hi)
      if not domain.strip() or not (math.isfinite(lo_v) and math.isfinite(hi_v)):
        raise DataError(f"data.rating_scales: {part!r} is not DOMAIN=MIN:MAX "
                        "(e.g. --config.data.rating_scales='books=1:5,movies=1:5')")
      out.append((domain.strip(), lo_v, hi_v))
  elif isinstance(spec, dict) or hasattr(spec, "items"):
    out = [(d, float(s[0]), float(s[1])) for d, s in spec.items()]
  else:
    out = [(d, float(lo), float(hi)) for d, lo, hi in spec]
  for domain, lo, hi in out:
    if not lo < hi:
      raise DataError(f"data.rating_scales: domain {domain!r} has MIN {lo:g} >= MAX {hi:g}")
  return tuple(out)


def parse_domain_tasks(spec) -> tuple[tuple[str, str], ...]:
  """``"books=rating,music=implicit"``, a dict or (domain, task) pairs."""
  if not spec:
    return ()
  if isinstance(spec, str):
    pairs = [tuple(x.strip() for x in p.partition("=")[::2]) for p in spec.split(",") if p.strip()]
  elif isinstance(spec, dict) or hasattr(spec, "items"):
    pairs = list(spec.items())
  else:
    pairs = [tuple(p) for p in spec]
  for domain, task in pairs:
    if not domain or task not in TASKS:
      raise DataError(f"data.domain_tasks: {domain}={task} is not DOMAIN=rating|implicit "
                      "(e.g. --config.data.domain_tasks='music=implicit')")
  return tuple(pairs)


def check_labels(path, domains: pa.Array, label: np.ndarray, keep: np.ndarray, place, policy,
                 scales: dict[str, tuple[float, float]], tasks: dict[str, str]) -> np.ndarray:
  """Domain-level label checks over the rows in ``keep``; returns the rows that pass."""
  ok = np.ones(len(label), bool)
  encoded = pc.dictionary_encode(domains)
  codes = encoded.indices.to_numpy(zero_copy_only=False)
  for code, domain in enumerate(encoded.dictionary.to_pylist()):
    rows = np.flatnonzero(keep & (codes == code))
    if not len(rows):
      continue
    values = label[rows]
    bad, why = _domain_problems(path, domain, values, rows, place, scales.get(domain),
                                tasks.get(domain))
    for j in np.flatnonzero(bad):
      policy.bad("bad_label", f"{place(int(rows[j]))}: field label {values[j]:g} {why(values[j])}")
      ok[rows[j]] = False
  return ok


def _domain_problems(path, domain, values, rows, place, scale, task):
  if scale is not None:
    lo, hi = scale
    return (values < lo) | (values > hi), lambda v: (
        f"is outside domain {domain!r}'s rating scale [{lo:g}, {hi:g}] (data.rating_scales)")
  if task == "implicit":
    return ~np.isin(values, (0.0, 1.0)), lambda v: (
        f"is not 0 or 1, but domain {domain!r} is declared implicit (data.domain_tasks)")
  negative = values < 0
  if negative.any():
    return negative, lambda v: (
        f"is negative; ratings are >= 0 unless domain {domain!r}'s scale is declared, e.g. "
        f"data.rating_scales='{domain}=-2:2'")
  clean = values
  if task is None and not np.isin(clean, (0.0, 1.0)).all() and (clean == 0).any() \
      and (clean > 1).any():
    zero, high = rows[np.argmax(clean == 0)], rows[np.argmax(clean > 1)]
    raise DataError(
        f"{path}: domain {domain!r} mixes 0/1 labels (implicit feedback) with ratings above 1 "
        f"({place(int(zero))}: label 0; {place(int(high))}: label {values[np.argmax(clean > 1)]:g}); "
        f"declare the task: data.domain_tasks='{domain}=rating' with data.rating_scales="
        f"'{domain}=0:{math.ceil(clean.max()):g}' if 0 is a rating, or "
        f"data.domain_tasks='{domain}=implicit' after mapping ratings to 0/1")
  if len(clean) >= _MIN_ROWS_FOR_OUTLIERS:
    # The upper quantile with method="lower" leaves out a single stray maximum.
    q_lo = float(np.quantile(clean, 0.01, method="lower"))
    q_hi = float(np.quantile(clean, 0.99, method="lower"))
    upper = q_hi + max(q_hi - q_lo, 5.0)
    return clean > upper, lambda v: (
        f"is far above domain {domain!r}'s other labels ({q_lo:g} to {q_hi:g}); fix the row, or "
        f"declare the scale if it is real: data.rating_scales='{domain}={math.floor(q_lo):g}:"
        f"{math.ceil(v):g}'")
  return np.zeros(len(values), bool), None
