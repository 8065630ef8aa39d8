"""Serving a frozen or tune (``config.encoder_mode``) run: the fused model, exactly as it was evaluated.

``served.load`` restores the network from the checkpoint and refits the CF parts on the same
prepared data set (they are deterministic functions of its train split); the fusion weights are
the ones tuned on valid. Users come as histories (the interactions layout): each is linked as in
training (secret + mapping, through ``processing.linked_histories``); a user known to training
keeps its ID rows, any other one is a cold user represented by its history, as at evaluation.
Candidates are the items of the items file, which must belong to the trained catalog (a frozen-mode
model has item factors and CF similarities only for the items it was trained on).
"""

from __future__ import annotations

import collections
from typing import Callable

import numpy as np
import scipy.sparse as sp

from crossrec_jax import ranking
from crossrec_jax.data.records import Interaction, Item, iter_rows
from crossrec_jax.interactions import InteractionData, Queries
from crossrec_jax.served import ServedModel


class CatalogError(ValueError):
  """Input the hybrid model cannot score (an item outside its catalog, an unknown domain)."""


class HistoryQueries:
  """Builds ``Queries`` for people from outside the interaction log."""

  def __init__(self, data: InteractionData, history_length: int):
    self.data, self.length = data, history_length
    self.index = {(d["name"], i): int(data.offsets[k]) + n
                  for k, (d, ids) in enumerate(zip(data.domains, data.item_ids))
                  for n, i in enumerate(ids)}
    self.user_index = {k: n for n, k in enumerate(data.user_keys)}
    self.known = data.train_users()

  def __call__(self, people: list[tuple[int, list[Interaction]]], domain: int, items=None) -> Queries:
    """``people``: (user index or -1, history); one query per person (catalog scoring), or per
    (person, item) pair when ``items`` (global indices, one per person) is given."""
    n, num_items = len(people), self.data.num_items
    history = np.full((n, self.length), -1, np.int64)
    rows, cols = [], []
    for k, (_, hist) in enumerate(people):
      newest_first = [self.index[(x.domain, x.item_id)] for x in
                      sorted(hist, key=lambda x: x.order, reverse=True)
                      if (x.domain, x.item_id) in self.index]
      seen = list(dict.fromkeys(newest_first))[:self.length]
      history[k, :len(seen)] = seen
      rows += [k] * len(seen)
      cols += seen
    context = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, num_items))
    user = np.array([u if u >= 0 and self.known[u] else -1 for u, _ in people], np.int64)
    item = np.zeros(n, np.int64) if items is None else np.asarray(items, np.int64)
    return Queries(user=user, domain=np.full(n, domain, np.int64), item=item,
                   label=np.zeros(n), context=context, row=np.full(n, -1, np.int64),
                   history=history)

  def user_of(self, key: str) -> int:
    return self.user_index.get(key, -1)


def _catalog_rows(data: InteractionData, index, items: dict[tuple[str, str], Item], wanted,
                  items_path):
  """Per wanted domain: the global indices of the items file's items (all must be trained);
  ``index``: (domain, item_id) -> global index of the trained catalog."""
  names = data.names
  unknown_domains = sorted({d for d, _ in items} - set(names))
  if unknown_domains:
    raise CatalogError(f"{items_path}: domain(s) {unknown_domains} are not domains of this "
                             f"model ({names})")
  outside = [key for key in items if key not in index]
  if outside:
    raise CatalogError(
        f"{items_path}: {len(outside)} item(s) are not in the catalog the hybrid model was trained "
        f"on, e.g. {outside[:3]}; score only trained items, or retrain with them in the items table")
  out = {}
  for name in wanted:
    rows = sorted(index[key] for key in items if key[0] == name)
    if rows:
      out[names.index(name)] = np.array(rows, np.int64)
  return out


def score_top_k(model: ServedModel, data: InteractionData, by_person: dict[str, list[Interaction]],
                user_key: Callable[[str], str], items, wanted, k: int, write, *,
                items_path="--items", chunk: int = 4096, progress=None) -> dict[str, int]:
  """Top-``k`` unseen catalog items per person and wanted domain, fused as at evaluation."""
  queries = HistoryQueries(data, _history_length(model))
  catalogs = _catalog_rows(data, queries.index, items, wanted, items_path)
  people = sorted(by_person)
  for start in range(0, len(people), chunk):
    part = people[start:start + chunk]
    batch = [(queries.user_of(user_key(p)), by_person[p]) for p in part]
    columns = collections.defaultdict(list)
    for d, rows in catalogs.items():
      q = queries(batch, d)
      lo = int(data.offsets[d])
      scores = model.score_catalog(q, d)                     # [n, domain catalog]
      allowed = np.full(scores.shape[1], False)
      allowed[rows - lo] = True
      scores = np.where(allowed[None, :], scores, -np.inf)
      seen = q.context[:, lo:int(data.offsets[d + 1])]
      exclude = ranking.padded_indices(seen)
      top_scores, top = (np.asarray(x) for x in ranking.masked_top_k(
          scores, exclude, k=min(k, scores.shape[1])))
      for n, person in enumerate(part):
        for rank, (j, s) in enumerate(zip(top[n], top_scores[n])):
          if not np.isfinite(s):
            continue
          columns["user_id"].append(person)
          columns["domain"].append(data.names[d])
          columns["rank"].append(rank + 1)
          columns["item_id"].append(data.item_ids[d][j])
          columns["score"].append(float(s))
    if columns:
      write(dict(columns))
    if progress is not None:
      progress.update(len(part))
  return {"users": len(people), "items": int(sum(len(r) for r in catalogs.values()))}


def score_pairs(model: ServedModel, data: InteractionData, by_person, user_key, items, pairs_path,
                person_of, wanted, write, *, items_path="--items", progress=None) -> dict[str, int]:
  """Scores of (user_id, item_id, domain) pairs: clipped predicted ratings on rating domains, the
  fused (z-scored) score on implicit ones, which is what ranked them at evaluation."""
  lookup = HistoryQueries(data, _history_length(model))
  catalogs = _catalog_rows(data, lookup.index, items, data.names, items_path)
  listed = {int(i) for rows in catalogs.values() for i in rows}
  names, rows = iter_rows(pairs_path)
  missing = [c for c in ("user_id", "item_id", "domain") if c not in names]
  if missing:
    raise CatalogError(f"{pairs_path}: missing column(s) {missing}; pairs need "
                             "user_id,item_id,domain")
  grouped = collections.defaultdict(list)       # domain -> [(user_id, item_id, person, global)]
  for place, row in rows:
    u, i, d = (str(row.get(c) or "").strip() for c in ("user_id", "item_id", "domain"))
    if d not in data.names:
      raise CatalogError(f"{place}: field domain {d!r} is not a domain of this model "
                               f"({data.names})")
    g = lookup.index.get((d, i))
    if g is None or g not in listed:
      raise CatalogError(f"{place}: field item_id {i!r} of domain {d!r} is not a trained "
                               "item listed in the items file")
    if d in wanted:
      grouped[data.names.index(d)].append((u, i, person_of(d, u), g))
  if not grouped:
    raise CatalogError(f"{pairs_path}: no pairs to score")
  total = 0
  for d, pairs in grouped.items():
    for person in {p for _, _, p, _ in pairs}:
      if not by_person.get(person):
        raise CatalogError(f"user {person!r} has no history in the users file: scoring needs "
                                 "at least one interaction (cold users: include their history)")
    batch = [(lookup.user_of(user_key(p)), by_person[p]) for _, _, p, _ in pairs]
    targets = np.array([g for _, _, _, g in pairs])
    q = lookup(batch, d, targets)
    spec = data.domains[d]
    if spec["task"] == "rating":
      score = np.clip(model.score_pairs(q), spec["min_rating"], spec["max_rating"])
    else:  # one catalog row per distinct person, however many pairs they have
      lo = int(data.offsets[d])
      people = list(dict.fromkeys(p for _, _, p, _ in pairs))
      row_of = {p: n for n, p in enumerate(people)}
      catalog = model.score_catalog(
          lookup([(lookup.user_of(user_key(p)), by_person[p]) for p in people], d), d)
      score = catalog[[row_of[p] for _, _, p, _ in pairs], targets - lo]
    write({"user_id": [u for u, _, _, _ in pairs], "item_id": [i for _, i, _, _ in pairs],
           "domain": [data.names[d]] * len(pairs), "task": [spec["task"]] * len(pairs),
           "score": np.asarray(score, np.float32)})
    total += len(pairs)
    if progress is not None:
      progress.update(len(pairs))
  return {"pairs": total, "users": len({p for v in grouped.values() for _, _, p, _ in v})}


def _history_length(model: ServedModel) -> int:
  s = model.hybrid.settings
  return s.history_length_all if model.hybrid.context == "all" else s.history_length
