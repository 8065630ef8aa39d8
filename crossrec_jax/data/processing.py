"""Raw records -> training / evaluation examples.

Steps: link users across platforms with a keyed hash, infer each domain's task, split without
leakage, and build each example's profile text from the user's cross-domain history strictly
before the target.
"""

from __future__ import annotations

import collections
import collections.abc
import csv
import dataclasses
import hashlib
import hmac
import logging
import math
import pathlib
import string
from typing import Any, Iterable, Sequence

import numpy as np

from crossrec_jax.data import labels as labels_lib
from crossrec_jax.data.records import DataError, Interaction, Item

CONTEXT_SPLITS = ("train", "history")  # rows a profile may be built from
TARGET_SPLITS = ("train", "valid", "test")
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2, "history": 3}  # examples are keyed in this order
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessingConfig:
  # Linkage: HMAC-SHA256(secret, person id). The person id is `user_id`, or the `person_id`
  # that `mapping_file` (CSV: domain,user_id,person_id) gives a platform-local user_id.
  # Empty: resolved per data set by data.link_secret.resolve (never a public default for real
  # data). Hidden from repr: tfds logs the builder config, which holds this dataclass.
  link_secret: str = dataclasses.field(default="", repr=False)
  mapping_file: str = ""
  store_raw_user_ids: bool = False
  # Splits: auto = the `split` column when present, else leave-last-out per user and domain.
  split: str = "auto"                  # auto | given | leave_last_out | ratio
  ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/valid/test for split="ratio"
  seed: int = 0
  # Profiles.
  item_template: str = "{domain}: {text}{rating}"
  rating_template: str = " (rated {label:g})"
  separator: str = " | "
  max_profile_items: int = 30
  max_items_per_domain: int = 12
  max_profile_words: int = 256
  cold_threshold: int = 1   # fewer prior interactions than this in the target domain = cold
  # Domains: {"name": "rating" | "implicit"}; unlisted domains are inferred.
  domain_tasks: tuple[tuple[str, str], ...] = ()
  domains: tuple[str, ...] = ()  # keep only these domains (empty: all)
  rating_scales: tuple[tuple[str, float, float], ...] = ()

  @classmethod
  def from_config(cls, config, link_secret: str) -> "ProcessingConfig":
    """From a run's config (``config.data`` and ``config.seed``): the one conversion training,
    evaluation and scoring build users and profiles through. ``link_secret``: the resolved
    secret's value (data.from_config.processing_config resolves it from the config)."""
    d = config.data
    return cls(
        link_secret=link_secret, mapping_file=d.mapping_file, split=d.split, ratio=tuple(d.ratio),
        seed=config.seed, max_profile_items=d.max_profile_items,
        max_items_per_domain=d.max_items_per_domain, max_profile_words=d.max_profile_words,
        domains=tuple(d.domains),
        # Declared labels (DOMAIN=MIN:MAX / DOMAIN=rating|implicit strings, settable from the CLI).
        rating_scales=labels_lib.parse_rating_scales(d.get("rating_scales", "")),
        domain_tasks=labels_lib.parse_domain_tasks(d.get("domain_tasks", "")))


def _source_of(x: Interaction) -> str:
  """The file an interaction came from ('' for generated data), for messages."""
  place = x.place
  return place.rsplit(":", 1)[0] if ":line " in place or ":row " in place else place


def _domain_spec_dicts(interactions: Sequence[Interaction], config: ProcessingConfig,
                       domains: list[str] | None = None, labels: list[float] | None = None):
  tasks = dict(config.domain_tasks)
  scales = {d: (lo, hi) for d, lo, hi in config.rating_scales}
  domains = [x.domain for x in interactions] if domains is None else domains
  labels = [x.label for x in interactions] if labels is None else labels
  names = sorted(set(domains))
  code = {d: i for i, d in enumerate(names)}
  domain = np.fromiter(map(code.__getitem__, domains), np.int64, len(domains))
  by_domain = np.argsort(domain, kind="stable")
  ends = np.cumsum(np.bincount(domain, minlength=len(names)))
  all_values = np.asarray(labels)
  specs = []
  for k, domain in enumerate(names):
    values = all_values[by_domain[ends[k - 1] if k else 0:ends[k]]]
    task = tasks.get(domain) or ("implicit" if np.all(np.isin(values, (0.0, 1.0))) else "rating")
    lo, hi = scales.get(domain, (math.floor(values.min()), math.ceil(values.max())))
    if task == "rating" and lo >= hi:
      source = _source_of(interactions[domains.index(domain)]) or "the data"
      raise DataError(f"{source}: all ratings of domain {domain!r} equal {lo:g}, so its rating "
                      f"scale cannot be inferred; declare it: data.rating_scales='{domain}=1:5' "
                      f"(ProcessingConfig.rating_scales), or data.domain_tasks='{domain}=implicit'")
    specs.append({"name": domain, "task": task, "min_rating": float(lo) if task == "rating" else 0.0,
                  "max_rating": float(hi) if task == "rating" else 1.0})
  return specs


def drop_duplicates(interactions: Sequence[Interaction], keys: Sequence[str]):
  """One row per (user, domain, item): the last by timestamp/position (file order on ties).

  Earlier repeats are dropped and counted: kept, they would sit in the profile of the row that
  is their own evaluation target, label included. Returns (interactions, keys, dropped per domain).
  """
  kept, dropped = _deduplicate(interactions, _orders(interactions), _codes(keys),
                               _codes([x.domain for x in interactions]),
                               _codes([x.item_id for x in interactions]))
  if kept is None:
    return interactions, keys, {}
  kept = kept.tolist()
  return [interactions[i] for i in kept], [keys[i] for i in kept], dropped


def _deduplicate(interactions, order, user, domain, item):
  """``drop_duplicates`` on integer codes: (the kept rows in file order, or None when no row is
  repeated; dropped rows per domain)."""
  by_order, last = _last_of_groups(order, user, domain, item)
  if last.all():
    return None, {}
  gone = np.sort(by_order[~last]).tolist()
  dropped = collections.Counter(interactions[i].domain for i in gone)
  example = interactions[gone[0]]
  log.warning("%d repeated (user, domain, item) row(s) dropped, keeping the latest of each "
              "(by timestamp/position, file order on ties): %s; first dropped: %s",
              sum(dropped.values()), dict(dropped), example.place or example.item_id)
  return np.sort(by_order[last]), dict(dropped)


def _orders(interactions: Sequence[Interaction]) -> np.ndarray:
  return np.asarray([x.order for x in interactions], np.float64)


def _codes(values: list) -> np.ndarray:
  """Each value's index among the distinct values, in order of first appearance."""
  code = {v: c for c, v in enumerate(dict.fromkeys(values))}
  return np.fromiter(map(code.__getitem__, values), np.int64, len(values))


def _last_of_groups(order: np.ndarray, *groups: np.ndarray):
  """Rows by ``groups`` (integer codes, the first the outermost), then order, then file order;
  and a mask over that ordering that marks each group's last row."""
  n = len(order)
  by_order = np.lexsort((np.arange(n), order, *reversed(groups)))
  same = np.ones(max(n - 1, 0), bool)
  for c in groups:
    c = c[by_order]
    same &= c[1:] == c[:-1]
  return by_order, np.append(~same, True) if n else np.zeros(0, bool)


def _no_train_rows(interactions, splits, keys, mode) -> str:
  per_group = collections.Counter(zip(keys, (x.domain for x in interactions)))
  source = _source_of(interactions[0]) or "the data"
  if mode in ("auto", "leave_last_out") and not any(x.split for x in interactions):
    return (f"{source}: no train rows: leave-last-out makes each user's last interaction per "
            f"domain a test row (and the one before it a valid row, from 3 on), and these data "
            f"have at most {max(per_group.values())} interaction(s) per user and domain. Use "
            "data.split='ratio', add a split column, or give users more interactions")
  return (f"{source}: no train rows after splitting (data.split={mode!r}); the split column or "
          "data.ratio must give some rows to train")


def read_mapping(path) -> dict[tuple[str, str], str]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: linkage mapping file does not exist")
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f)
    missing = {"domain", "user_id", "person_id"} - set(reader.fieldnames or ())
    if missing:
      raise DataError(f"{path}: mapping file lacks column(s) {sorted(missing)}; it needs "
                      "domain,user_id,person_id")
    mapping = {}
    for row in reader:
      if not row["person_id"]:
        raise DataError(f"{path}:line {reader.line_num}: field person_id is empty")
      mapping[(row["domain"], row["user_id"])] = row["person_id"]
  return mapping


def link_key(secret: str, person_id: str) -> str:
  """Shared pseudonymous user key: HMAC-SHA256(secret, person id), hex, 32 chars."""
  return hmac.new(secret.encode(), person_id.encode(), hashlib.sha256).hexdigest()[:32]


def person_lookup(config: ProcessingConfig):
  """``person_of(domain, user_id)``: the person a platform-local user is (the mapping file's
  person_id, else the user_id itself). Training and scoring both link users through it."""
  mapping = read_mapping(config.mapping_file) if config.mapping_file else {}
  return lambda domain, user: mapping.get((domain, user), user)


def linked_histories(history: Sequence[Interaction], config: ProcessingConfig):
  """Histories grouped by person exactly as training linked users (mapping file, then the keyed
  hash of the person), and ``user_key(person)`` / ``person_of(domain, user_id)``."""
  person_of = person_lookup(config)
  by_person = collections.defaultdict(list)
  for x in history:
    by_person[person_of(x.domain, x.user_id)].append(x)
  return by_person, (lambda person: link_key(config.link_secret, person)), person_of


def link_users(interactions: Sequence[Interaction], config: ProcessingConfig) -> list[str]:
  """Each interaction's user key, by index (raw IDs are not kept)."""
  return _link_keys([x.domain for x in interactions], [x.user_id for x in interactions], config)


def _link_keys(domains: list[str], user_ids: list[str], config: ProcessingConfig) -> list[str]:
  if not config.link_secret:
    raise DataError("link_secret is empty: user linkage needs a secret key (HMAC-SHA256); "
                    "resolve one with crossrec_jax.data.link_secret.resolve")
  people = (list(map(person_lookup(config), domains, user_ids)) if config.mapping_file
            else user_ids)  # without a mapping file, each user_id is its own person
  key_of = {person: link_key(config.link_secret, person) for person in dict.fromkeys(people)}
  return list(map(key_of.__getitem__, people))


def assign_splits(interactions: Sequence[Interaction], user_keys: Sequence[str],
                  config: ProcessingConfig) -> list[str]:
  return _assign_splits(interactions, config, lambda: (
      _orders(interactions), _codes(list(user_keys)), _codes([x.domain for x in interactions])))


def _assign_splits(interactions: Sequence[Interaction], config: ProcessingConfig,
                   groups) -> list[str]:
  """``assign_splits``; ``groups()``: the rows' orders, user codes and domain codes."""
  given = [x.split for x in interactions]
  mode = config.split
  if mode == "auto":
    mode = "given" if any(given) else "leave_last_out"
  if mode == "given":
    missing = next((x for x, s in zip(interactions, given) if not s), None)
    if missing is not None:
      raise DataError(f"{missing.place}: field split is empty while other rows have one; fill "
                      "it for every row or drop the column")
    return list(given)
  if mode == "ratio":
    train, valid, test = config.ratio
    if min(config.ratio) < 0 or abs(train + valid + test - 1.0) > 1e-6:
      raise DataError(f"ratio {config.ratio} must be three non-negative fractions summing to 1")
    u = np.random.default_rng(config.seed).random(len(interactions))
    return np.where(u < train, "train", np.where(u < train + valid, "valid", "test")).tolist()
  if mode == "leave_last_out":
    if not interactions:
      return []
    # Per (user, domain), by order (file order on ties): the last row is test and, in groups
    # of 3 or more, the one before it valid.
    by_order, last = _last_of_groups(*groups())
    group = np.cumsum(np.append(True, last[:-1]))  # each row's group, in that ordering
    before_last = np.append(last[1:], False) & ~last
    big = (np.bincount(group) >= 3)[group]
    out = np.full(len(interactions), "train", dtype=object)
    out[by_order[last]] = "test"
    out[by_order[before_last & big]] = "valid"
    return out.tolist()
  raise DataError(f"unknown split mode {config.split!r}; use auto, given, leave_last_out or ratio")


def _item_line(x: Interaction, items, task: str, config: ProcessingConfig) -> str:
  item = items[(x.domain, x.item_id)]
  text = item.text or f"item {x.item_id}"
  rating = config.rating_template.format(label=x.label) if task == "rating" else ""
  return config.item_template.format(domain=x.domain, text=text, rating=rating)


def select_profile(entries: Iterable[tuple[str, str]], config: ProcessingConfig) -> str:
  """Joins (domain, line) entries, newest first, within the per-domain and total caps."""
  return _select(((d, line, len(line.split())) for d, line in entries), config)


def _select(entries: Iterable[tuple[str, str, int]], config: ProcessingConfig,
            n_domains: int = -1) -> str:
  """``select_profile`` over (domain, line, word count): build_examples counts words once per
  line, not once per target that line precedes. With ``n_domains`` (how many domains the
  entries have) it stops once every domain is at its cap: nothing after that could be chosen."""
  chosen, per_domain, words, capped = [], {}, 0, 0
  max_items, max_words, per_cap = (config.max_profile_items, config.max_profile_words,
                                   config.max_items_per_domain)
  for domain, line, n_words in entries:
    if len(chosen) >= max_items or words >= max_words or capped == n_domains:
      break
    used = per_domain.get(domain, 0)
    if used >= per_cap or words + n_words > max_words:
      continue
    chosen.append(line)
    per_domain[domain] = used + 1
    words += n_words
    capped += used + 1 == per_cap
  return config.separator.join(chosen)


def user_profile(history: Sequence[Interaction], items: dict[tuple[str, str], Item],
                 tasks: dict[str, str], config: ProcessingConfig, before: float | None = None) -> str:
  """A user's profile text from their interactions (any order), as in training: newest first,
  only interactions strictly before ``before`` when given."""
  ordered = sorted((x for x in history if before is None or x.order < before), key=lambda x: x.order)
  return select_profile(((x.domain, _item_line(x, items, tasks[x.domain], config))
                         for x in reversed(ordered)), config)


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
