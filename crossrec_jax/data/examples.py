"""Training examples from linked, split interactions: ``build_examples`` (prepare's last step).

Column-wise (numpy sorts and searches over all users at once): each example's profile text is
built from the user's context interactions strictly before it, newest first, within the profile
caps of ``ProcessingConfig``. Split out of ``processing.py``, which links users and assigns
splits; this module only reads its results.
"""

from __future__ import annotations

import collections
import collections.abc
import math
import string
from typing import Any, Sequence

import numpy as np

from crossrec_jax.data.processing import (CONTEXT_SPLITS, TARGET_SPLITS, _SPLIT_CODE,
                                          ProcessingConfig, _assign_splits, _codes, _deduplicate,
                                          _domain_spec_dicts, _link_keys,
                                          _no_train_rows, _select)
from crossrec_jax.data.records import DataError, Interaction, Item


def _entries(pair: np.ndarray, pairs: list[tuple[str, str]], labels: list[float], items,
             tasks: dict[str, str], config: ProcessingConfig) -> list[tuple[str, str, int]]:
  """Each row's profile entry (domain, line, word count), as ``_item_line`` writes the line,
  for rows of item ``pairs[pair[k]]`` and label ``labels[k]``: each distinct line is built and
  its words counted once, however many users and targets it appears for."""
  # A rating line writes '-0' for -0.0, which equals 0.0: a zero label's key carries its sign.
  label_keys = [y if y else (y, math.copysign(1.0, y)) for y in labels]
  label_code = {k: c for c, k in enumerate(dict.fromkeys(label_keys))}
  ratings = [config.rating_template.format(label=k[0] if isinstance(k, tuple) else k)
             for k in label_code] + [""]  # the last: no rating (implicit domains)
  rated = np.asarray([tasks[d] == "rating" for d, _ in pairs], bool)
  rating = np.where(rated[pair], np.fromiter(map(label_code.__getitem__, label_keys), np.int64,
                                             len(labels)), len(ratings) - 1)
  distinct, row_entry = np.unique(pair * len(ratings) + rating, return_inverse=True)
  fields = list(string.Formatter().parse(config.item_template))
  entries = []
  if (fields and fields[-1][1:] == ("rating", "", None)
      and sum(f[1] == "rating" for f in fields) == 1):
    # '...{rating}' (the default): a line is its item's text part plus the rating, so each
    # item's part is formatted and its words counted once.
    part = {}
    for p in np.unique(distinct // len(ratings)).tolist():
      domain, item_id = pairs[p]
      text = items[(domain, item_id)].text or f"item {item_id}"
      line = config.item_template.format(domain=domain, text=text, rating="")
      part[p] = domain, line, len(line.split()), not line or line[-1].isspace()
    # A rating that starts with a space (or follows one) adds its own words; else the two
    # parts' words may run together and the line is counted whole.
    rating_words = [(len(r.split()), not r or r[0].isspace()) for r in ratings]
    for p, r in zip(*(v.tolist() for v in np.divmod(distinct, len(ratings)))):
      domain, text, words, open_end = part[p]
      more, opens = rating_words[r]
      line = text + ratings[r]
      entries.append((domain, line, words + more if open_end or opens else len(line.split())))
  else:
    for p, r in zip(*(v.tolist() for v in np.divmod(distinct, len(ratings)))):
      domain, item_id = pairs[p]
      text = items[(domain, item_id)].text or f"item {item_id}"
      line = config.item_template.format(domain=domain, text=text, rating=ratings[r])
      entries.append((domain, line, len(line.split())))
  return list(map(entries.__getitem__, row_entry.reshape(-1).tolist()))


class Records(collections.abc.Sequence):
  """One split's examples, stored by column (name -> list); reads as a sequence of dicts."""

  def __init__(self, columns: dict[str, list]):
    self.columns = columns
    self._len = len(next(iter(columns.values()))) if columns else 0

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    if isinstance(i, slice):
      return Records({k: v[i] for k, v in self.columns.items()})
    return {k: v[i] for k, v in self.columns.items()}

  def __iter__(self):
    names = list(self.columns)
    return (dict(zip(names, values)) for values in zip(*self.columns.values()))

  def __eq__(self, other):
    return isinstance(other, collections.abc.Sequence) and list(self) == list(other)

  def __repr__(self) -> str:
    return f"Records({len(self)} examples: {', '.join(self.columns)})"


def build_examples(interactions: Sequence[Interaction], items: dict[tuple[str, str], Item],
                   config: ProcessingConfig) -> dict[str, Any]:
  """Returns dict(examples={split: Records}, items=[record], domains=[spec], counts=...).

  A target's profile is built from the same user's context rows (train and history splits)
  strictly before it, newest first; ``cold`` and ``history_items`` look at the context rows of
  the target's domain the same way. Done column-wise (numpy sorts and binary searches over
  all users at once); only the profile strings are joined one target at a time.
  """
  domains = [x.domain for x in interactions]
  labels = [x.label for x in interactions]
  specs = _domain_spec_dicts(interactions, config, domains, labels)
  task = {s["name"]: s["task"] for s in specs}
  index = {s["name"]: i for i, s in enumerate(specs)}
  keys = _link_keys(domains, [x.user_id for x in interactions], config)
  item_ids = [x.item_id for x in interactions]
  orders = [x.order for x in interactions]
  n = len(interactions)
  pick = lambda values, rows: list(map(values.__getitem__, rows))
  user = _codes(keys)  # users in order of first appearance, as examples are written
  domain = np.fromiter(map(index.__getitem__, domains), np.int64, n)
  item_names = list(dict.fromkeys(item_ids))
  item = _codes(item_ids)
  order = np.asarray(orders, np.float64)
  kept, duplicates = _deduplicate(interactions, order, user, domain, item)
  if kept is not None:
    user, domain, item, order = user[kept], domain[kept], item[kept], order[kept]
    kept = kept.tolist()
    interactions, keys, domains, item_ids, labels, orders = (
        pick(v, kept) for v in (interactions, keys, domains, item_ids, labels, orders))
    n = len(interactions)
    distinct, first = np.unique(user, return_index=True)  # renumber by first appearance
    renumber = np.empty(int(distinct[-1]) + 1, np.int64)
    renumber[distinct[np.argsort(first)]] = np.arange(len(distinct))
    user = renumber[user]
  splits = _assign_splits(interactions, config, lambda: (order, user, domain))
  if "train" not in splits:
    raise DataError(_no_train_rows(interactions, splits, keys, config.split))

  distinct, pair = np.unique(domain * len(item_names) + item, return_inverse=True)
  pair = pair.reshape(-1)
  names = list(index)
  pairs = [(names[d], item_names[i]) for d, i in zip(*(v.tolist() for v in np.divmod(
      distinct, len(item_names))))]
  n_users = int(user.max()) + 1
  split = np.fromiter((_SPLIT_CODE.get(s, -1) for s in splits), np.int64, n)
  rank = np.unique(order, return_inverse=True)[1].reshape(-1)
  n_ranks, n_domains = int(rank.max()) + 1, len(index)

  train = split == _SPLIT_CODE["train"]
  user_in_train = np.zeros(n_users, bool)
  user_in_train[user[train]] = True
  item_in_train = np.zeros(len(pairs), bool)
  item_in_train[pair[train]] = True

  # Context rows by user, then order (file order on ties): each user's rows are one run.
  context = np.flatnonzero(np.isin(split, [_SPLIT_CODE[s] for s in CONTEXT_SPLITS]))
  by_user = context[np.lexsort((rank[context], user[context]))]
  context_rows = by_user.tolist()
  run_user = user[by_user]
  users = np.arange(n_users)
  run_start = np.searchsorted(run_user, users, "left")
  run_end = np.searchsorted(run_user, users, "right")
  # ... and by user, domain, then order: each (user, domain)'s rows are one run.
  by_domain = context[np.lexsort((rank[context], domain[context], user[context]))]
  domain_key = (user[by_domain] * n_domains + domain[by_domain]) * n_ranks + rank[by_domain]

  # Every target's count of earlier context rows: in all domains (its profile's length before
  # the caps) and in its own domain (cold start, excluded history items).
  targets = np.flatnonzero(np.isin(split, [_SPLIT_CODE[s] for s in TARGET_SPLITS]))
  targets = targets[np.argsort(user[targets], kind="stable")]  # by user, then file order
  t_user, t_domain, t_rank = user[targets], domain[targets], rank[targets]
  start = run_start[t_user]
  earlier = np.searchsorted(run_user * n_ranks + rank[by_user], t_user * n_ranks + t_rank) - start
  domain_run = (t_user * n_domains + t_domain) * n_ranks
  domain_start = np.searchsorted(domain_key, domain_run)
  in_domain = np.searchsorted(domain_key, domain_run + t_rank) - domain_start

  profiles = _profiles(by_user, run_user, run_start, run_end, by_domain,
                       domain_key // n_ranks, n_domains, earlier, t_user,
                       _entries(pair[by_user], pairs, pick(labels, context_rows),
                                items, task, config), config)

  # Ranking evaluation excludes the user's earlier items of the target domain, newest first.
  implicit = np.asarray([task[s["name"]] == "implicit" for s in specs], bool)[t_domain]
  history = [[]] * len(targets)
  if implicit.any():
    domain_items = pick(item_ids, by_domain.tolist())
    starts, counts = domain_start.tolist(), in_domain.tolist()
    for k in np.flatnonzero(implicit & (in_domain > 0)).tolist():
      history[k] = domain_items[starts[k]:starts[k] + counts[k]][::-1]
  history = [h if h else [] for h in history]  # one list per example

  texts = [items[p].text for p in pairs]
  examples = {}
  for name, code in _SPLIT_CODE.items():
    if name == "history":
      rows = np.flatnonzero(split == code)
      rows = rows[np.argsort(user[rows], kind="stable")]
      if len(rows):
        r = rows.tolist()
        examples[name] = Records({
            "user_key": pick(keys, r), "domain": pick(domains, r),
            "domain_index": domain[rows].tolist(), "item_id": pick(item_ids, r),
            "label": pick(labels, r), "order": pick(orders, r),
            "user_tags": [list(interactions[i].user_tags) for i in r],
            "user_in_train": user_in_train[user[rows]].tolist(),
            "item_in_train": item_in_train[pair[rows]].tolist()})
      continue
    chosen = np.flatnonzero(split[targets] == code)
    rows = targets[chosen]
    r, c = rows.tolist(), chosen.tolist()
    examples[name] = Records({
        "user_key": pick(keys, r), "domain": pick(domains, r),
        "domain_index": domain[rows].tolist(), "item_id": pick(item_ids, r),
        "item_text": pick(texts, pair[rows].tolist()),
        "label": pick(labels, r), "profile": pick(profiles, c), "order": pick(orders, r),
        "cold": (in_domain[chosen] < config.cold_threshold).tolist(),
        "history_items": pick(history, c),
        "user_in_train": user_in_train[user[rows]].tolist(),
        "item_in_train": item_in_train[pair[rows]].tolist(),
        "raw_user_id": ([interactions[i].user_id for i in r] if config.store_raw_user_ids
                        else [""] * len(r)),
        "user_tags": [list(interactions[i].user_tags) for i in r]})

  train_items = {p for p, t in zip(pairs, item_in_train.tolist()) if t}
  item_records = [{"domain": d, "item_id": i, "item_text": it.text, "item_tags": list(it.tags),
                   "domain_index": index[d],
                   "item_in_train": (d, i) in train_items}
                  for (d, i), it in sorted(items.items()) if d in index]
  return {"examples": examples, "items": item_records, "domains": specs,
          "counts": _counts(domain, list(index), split, splits, user, item_records),
          "duplicates": duplicates}


def _profiles(by_user, run_user, run_start, run_end, by_domain, domain_group, n_domains: int,
              earlier, t_user, entries, config: ProcessingConfig) -> list[str]:
  """Each target's profile: the ``earlier`` oldest of its user's context entries, newest first,
  within the caps. ``by_user``: context rows by user then order, ``run_user`` their users,
  ``run_start``/``run_end`` each user's run, ``entries`` their (domain, line, words);
  ``by_domain``: the same rows by user, domain, then order, ``domain_group`` their user *
  n_domains + domain. Where no cap binds (most targets) a profile is one slice of the user's
  entries reversed; otherwise ``_select`` walks them."""
  m = len(by_user)
  # Entries newest first within each user's run: a target's profile is then a contiguous slice.
  newest_first = (run_start[run_user] + run_end[run_user] - 1 - np.arange(m)).tolist()
  lines = [entries[j][1] for j in newest_first]
  words = np.fromiter((e[2] for e in entries), np.int64, m)
  total = np.concatenate(([0], np.cumsum(words)))
  # Per entry: how many of its user's entries so far are of its domain; then the running most.
  where = np.zeros(int(by_user.max()) + 1 if m else 0, np.int64)
  where[by_user] = np.arange(m)
  count = np.empty(m, np.int64)
  count[where[by_domain]] = np.arange(m) - np.searchsorted(domain_group, domain_group) + 1
  top = np.maximum.accumulate(count + run_user * (m + 1)) - run_user * (m + 1)
  start, end = run_start[t_user], run_end[t_user]
  first = start + earlier
  fits = ((earlier <= config.max_profile_items)
          & (total[first] - total[start] < config.max_profile_words)
          & ((earlier == 0) | (top[np.maximum(first - 1, 0)] <= config.max_items_per_domain)))
  separator = config.separator
  lo, hi = (end - earlier).tolist(), end.tolist()
  out = [separator.join(lines[a:b]) for a, b in zip(lo, hi)]
  slow = np.flatnonzero(~fits).tolist()
  if slow:
    ordered = [entries[j] for j in newest_first]
    domains_of = np.bincount(np.unique(domain_group) // max(n_domains, 1),
                             minlength=len(run_start))  # distinct domains per user
    for k in slow:
      out[k] = _select(ordered[lo[k]:hi[k]], config, int(domains_of[t_user[k]]))
  return out


def _counts(domain: np.ndarray, names: list[str], split: np.ndarray, splits: list[str],
            user: np.ndarray, item_records) -> dict[str, Any]:
  """Users, items and interactions per split of each domain (``domain``: rows' indices into
  ``names``; ``split``: their split codes, -1 for any other split in ``splits``); splits listed
  in order of first appearance in the domain, as a counter would."""
  split_names = list(_SPLIT_CODE)
  if (split < 0).any():
    split_names = list(dict.fromkeys(splits))
    split = _codes(splits)
  group = domain * len(split_names) + split
  sizes = np.bincount(group, minlength=len(names) * len(split_names))
  first = np.full(len(sizes), len(group), np.int64)
  np.minimum.at(first, group, np.arange(len(group)))  # each group's first row
  per_domain = {d: {} for d in names}
  for g in np.argsort(first, kind="stable").tolist():
    if sizes[g]:
      per_domain[names[g // len(split_names)]][split_names[g % len(split_names)]] = int(sizes[g])
  n_users = int(user.max()) + 1
  seen = np.zeros(len(names) * n_users, bool)
  seen[domain * n_users + user] = True
  users = seen.reshape(len(names), n_users).sum(axis=1)
  items = collections.Counter(r["domain"] for r in item_records)
  return {"users": n_users,
          "domains": {d: {"users": int(users[k]), "items": items[d],
                          "interactions": per_domain[d]}
                      for k, d in sorted(enumerate(names), key=lambda kd: kd[1])
                      if per_domain[d]}}
