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
from typing import Iterable, Sequence

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
