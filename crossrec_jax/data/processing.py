"""Raw records -> training / evaluation examples.

Steps: link users across platforms with a keyed hash, infer each domain's task, split without
leakage, and build each example's profile text from the user's cross-domain history strictly
before the target.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import hashlib
import hmac
import logging
import math
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from crossrec_jax.data import labels as labels_lib
from crossrec_jax.data.records import DataError, Interaction, Item

CONTEXT_SPLITS = ("train", "history")  # rows a profile may be built from
TARGET_SPLITS = ("train", "valid", "test")
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


def _domain_spec_dicts(interactions: Sequence[Interaction], config: ProcessingConfig):
  tasks = dict(config.domain_tasks)
  scales = {d: (lo, hi) for d, lo, hi in config.rating_scales}
  labels, first = collections.defaultdict(list), {}
  for x in interactions:
    labels[x.domain].append(x.label)
    first.setdefault(x.domain, x)
  specs = []
  for domain in sorted(labels):
    values = np.asarray(labels[domain])
    task = tasks.get(domain) or ("implicit" if np.all(np.isin(values, (0.0, 1.0))) else "rating")
    lo, hi = scales.get(domain, (math.floor(values.min()), math.ceil(values.max())))
    if task == "rating" and lo >= hi:
      source = _source_of(first[domain]) or "the data"
      raise DataError(f"{source}: all ratings of domain {domain!r} equal {lo:g}, so its rating "
                      f"scale cannot be inferred; declare it: data.rating_scales='{domain}=1:5' "
                      f"(ProcessingConfig.rating_scales), or data.domain_tasks='{domain}=implicit'")
    specs.append({"name": domain, "task": task, "min_rating": float(lo) if task == "rating" else 0.0,
                  "max_rating": float(hi) if task == "rating" else 1.0})
  return specs


def drop_duplicates(interactions: Sequence[Interaction], keys: dict[int, str]):
  """One row per (user, domain, item): the last by timestamp/position (file order on ties).

  Earlier repeats are dropped and counted: kept, they would sit in the profile of the row that
  is their own evaluation target, label included. Returns (interactions, keys, dropped per domain).
  """
  last: dict[tuple[str, str, str], int] = {}
  for i, x in enumerate(interactions):
    k = (keys[i], x.domain, x.item_id)
    j = last.get(k)
    if j is None or x.order >= interactions[j].order:
      last[k] = i
  if len(last) == len(interactions):
    return interactions, keys, {}
  kept = sorted(last.values())
  kept_set = set(kept)
  dropped = collections.Counter(x.domain for i, x in enumerate(interactions) if i not in kept_set)
  example = next(x for i, x in enumerate(interactions) if i not in kept_set)
  log.warning("%d repeated (user, domain, item) row(s) dropped, keeping the latest of each "
              "(by timestamp/position, file order on ties): %s; first dropped: %s",
              sum(dropped.values()), dict(dropped), example.place or example.item_id)
  return [interactions[i] for i in kept], {n: keys[i] for n, i in enumerate(kept)}, dict(dropped)


def _no_train_rows(interactions, splits, keys, mode) -> str:
  per_group = collections.Counter((keys[i], x.domain) for i, x in enumerate(interactions))
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


def link_users(interactions: Sequence[Interaction], config: ProcessingConfig) -> dict[int, str]:
  """Maps each interaction's index to its user key (raw IDs are not kept)."""
  if not config.link_secret:
    raise DataError("link_secret is empty: user linkage needs a secret key (HMAC-SHA256); "
                    "resolve one with crossrec_jax.data.link_secret.resolve")
  person_of = person_lookup(config)
  keys, cache = {}, {}
  for i, x in enumerate(interactions):
    person = person_of(x.domain, x.user_id)
    if person not in cache:
      cache[person] = link_key(config.link_secret, person)
    keys[i] = cache[person]
  return keys


def assign_splits(interactions: Sequence[Interaction], user_keys: dict[int, str],
                  config: ProcessingConfig) -> list[str]:
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
    return ["train" if r < train else "valid" if r < train + valid else "test" for r in u]
  if mode == "leave_last_out":
    splits = ["train"] * len(interactions)
    groups = collections.defaultdict(list)
    for i, x in enumerate(interactions):
      groups[(user_keys[i], x.domain)].append(i)
    for rows in groups.values():
      rows.sort(key=lambda i: interactions[i].order)
      splits[rows[-1]] = "test"
      if len(rows) >= 3:
        splits[rows[-2]] = "valid"
    return splits
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


def _profile_maker(entries: list[tuple[str, str, int]], config: ProcessingConfig):
  """``end -> _select(entries[end-1], ..., entries[0])`` for one user's context (oldest first).
  Where no cap binds (most targets) the profile is all of them, newest first, joined at once."""
  words, most, top, counts = [0], 0, [0], {}
  for domain, _, n_words in entries:
    words.append(words[-1] + n_words)
    counts[domain] = used = counts.get(domain, 0) + 1
    most = used if used > most else most
    top.append(most)
  lines = [line for _, line, _ in entries]
  n_domains, separator = len(counts), config.separator

  def profile(end: int) -> str:
    if (end <= config.max_profile_items and words[end] < config.max_profile_words
        and top[end] <= config.max_items_per_domain):
      return separator.join(lines[:end][::-1])
    return _select(map(entries.__getitem__, range(end - 1, -1, -1)), config, n_domains)
  return profile


def user_profile(history: Sequence[Interaction], items: dict[tuple[str, str], Item],
                 tasks: dict[str, str], config: ProcessingConfig, before: float | None = None) -> str:
  """A user's profile text from their interactions (any order), as in training: newest first,
  only interactions strictly before ``before`` when given."""
  ordered = sorted((x for x in history if before is None or x.order < before), key=lambda x: x.order)
  return select_profile(((x.domain, _item_line(x, items, tasks[x.domain], config))
                         for x in reversed(ordered)), config)


class _EntryCache(dict):
  """(domain, item, label) -> (domain, profile line, word count): a line is formatted and its
  words counted once, however many users and targets it appears for."""

  def __init__(self, items, tasks: dict[str, str], config: ProcessingConfig):
    super().__init__()
    self.items, self.tasks, self.config = items, tasks, config

  def __call__(self, x: Interaction) -> tuple[str, str, int]:
    key = (x.domain, x.item_id, x.label)
    if not x.label:  # 0.0 == -0.0, but a rating line writes '-0'
      key += (math.copysign(1.0, x.label),)
    entry = self.get(key)
    if entry is None:
      line = _item_line(x, self.items, self.tasks[x.domain], self.config)
      entry = self[key] = (x.domain, line, len(line.split()))
    return entry


def build_examples(interactions: Sequence[Interaction], items: dict[tuple[str, str], Item],
                   config: ProcessingConfig) -> dict[str, Any]:
  """Returns dict(examples={split: [record]}, items=[record], domains=[spec], counts=...)."""
  specs = _domain_spec_dicts(interactions, config)
  task = {s["name"]: s["task"] for s in specs}
  index = {s["name"]: i for i, s in enumerate(specs)}
  keys = link_users(interactions, config)
  interactions, keys, duplicates = drop_duplicates(interactions, keys)
  splits = assign_splits(interactions, keys, config)
  if "train" not in splits:
    raise DataError(_no_train_rows(interactions, splits, keys, config.split))

  by_user = collections.defaultdict(list)
  for i, x in enumerate(interactions):
    by_user[keys[i]].append(i)
  train_users = {keys[i] for i, s in enumerate(splits) if s == "train"}
  train_items = {(x.domain, x.item_id) for x, s in zip(interactions, splits) if s == "train"}

  examples = {s: [] for s in TARGET_SPLITS + ("history",)}
  entry_of = _EntryCache(items, task, config)
  order_of = lambda x: x.order
  for user, rows in by_user.items():
    context = sorted((interactions[i] for i in rows if splits[i] in CONTEXT_SPLITS), key=order_of)
    context_order = [x.order for x in context]
    domain_orders, domain_items = collections.defaultdict(list), collections.defaultdict(list)
    for x in context:
      domain_orders[x.domain].append(x.order)
      domain_items[x.domain].append(x.item_id)
    profile_of = _profile_maker(list(map(entry_of, context)), config)
    user_in_train = user in train_users
    for target in rows:
      split = splits[target]
      x = interactions[target]
      item = (x.domain, x.item_id)
      if split == "history":  # context only: kept so the data set holds the whole log
        examples[split].append({
            "user_key": user, "domain": x.domain, "domain_index": index[x.domain],
            "item_id": x.item_id, "label": x.label, "order": x.order,
            "user_tags": list(x.user_tags), "user_in_train": user_in_train,
            "item_in_train": item in train_items})
        continue
      if split not in TARGET_SPLITS:
        continue
      # Strictly earlier context only: never the target itself, nothing at or after its time.
      end = bisect.bisect_left(context_order, x.order)
      in_domain = bisect.bisect_left(domain_orders[x.domain], x.order)
      # Ranking evaluation excludes the user's earlier items of the target domain, newest first.
      history = [] if task[x.domain] != "implicit" else domain_items[x.domain][:in_domain][::-1]
      examples[split].append({
          "user_key": user, "domain": x.domain, "domain_index": index[x.domain],
          "item_id": x.item_id, "item_text": items[item].text,
          "label": x.label, "profile": profile_of(end), "order": x.order,
          "cold": in_domain < config.cold_threshold, "history_items": history,
          "user_in_train": user_in_train, "item_in_train": item in train_items,
          "raw_user_id": x.user_id if config.store_raw_user_ids else "",
          "user_tags": list(x.user_tags),
      })

  if not examples["history"]:
    del examples["history"]  # only data with a given `history` split has context-only rows
  item_records = [{"domain": d, "item_id": i, "item_text": it.text, "item_tags": list(it.tags),
                   "domain_index": index[d],
                   "item_in_train": (d, i) in train_items}
                  for (d, i), it in sorted(items.items()) if d in index]
  return {"examples": examples, "items": item_records, "domains": specs,
          "counts": _counts(interactions, splits, keys, item_records), "duplicates": duplicates}


def _counts(interactions, splits, keys, item_records) -> dict[str, Any]:
  per_domain = collections.defaultdict(lambda: collections.Counter())
  users = collections.defaultdict(set)
  for i, (x, s) in enumerate(zip(interactions, splits)):
    per_domain[x.domain][s] += 1
    users[x.domain].add(keys[i])
  items = collections.Counter(r["domain"] for r in item_records)
  return {"users": len(set(keys.values())),
          "domains": {d: {"users": len(users[d]), "items": items[d],
                          "interactions": dict(per_domain[d])} for d in sorted(per_domain)}}
