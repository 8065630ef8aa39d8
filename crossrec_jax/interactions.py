"""The interaction log as integer arrays, and evaluation queries over it.

``InteractionData.from_builder(builder)`` reads a prepared data set (every split, including the
context-only ``history`` rows) into flat arrays: user index, domain, item (global index, domains
side by side in catalog order), label, order and split. The hybrid model, the classical models
and the evaluator all work on this one view, so they see exactly the same split.

``Queries`` are what a recommender is asked about: for each target, the user (or -1 for a user
without train interactions), the target domain and item, and the user's context strictly before
the target (all domains), which is also what a cold user is represented by.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from tensorflow_datasets.proto import tf_example_pb2

from crossrec_jax.data.processing import CONTEXT_SPLITS

_SPLITS = ("train", "valid", "test", "history")
_CACHE_FILE = "interaction_log.npz"


@dataclasses.dataclass
class InteractionData:
  domains: list[dict]              # name, task, min_rating, max_rating
  item_ids: list[list[str]]        # per domain, catalog order
  item_texts: list[str]            # global item order
  item_tags: list[list[str]]       # global item order: categorical side features
  user_keys: list[str]
  user: np.ndarray                 # per interaction
  domain: np.ndarray
  item: np.ndarray                 # global item index
  label: np.ndarray
  order: np.ndarray
  split: np.ndarray                # train / valid / test / history
  user_tags: list[list[str]] = dataclasses.field(default_factory=list)  # per user: side features

  def __post_init__(self):
    if not self.user_tags:
      self.user_tags = [[] for _ in self.user_keys]

  # ---------------------------------------------------------------------------- construction
  @classmethod
  def from_builder(cls, builder) -> "InteractionData":
    """Reads the prepared data set once; the arrays are then cached next to it (decoding the
    records is slow: ~0.2 ms each), in ``interaction_log.npz`` (no pickle)."""
    domains = list(builder.info.metadata["domains"])
    cache = pathlib.Path(builder.data_dir) / _CACHE_FILE
    if cache.is_file():
      try:
        with np.load(cache, allow_pickle=False) as z:
          sizes = z["domain_sizes"]
          flat_ids, texts = list(z["item_ids"]), list(z["item_texts"])
          tags = [t.split("|") if t else [] for t in z["item_tags"]]
          user_tags = [t.split("|") if t else [] for t in z["user_tags"]]
          bounds = np.concatenate([[0], np.cumsum(sizes)])
          return cls(domains, [flat_ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                     texts, tags, list(z["user_keys"]), z["user"], z["domain"], z["item"], z["label"],
                     z["order"], z["split"], user_tags)
      except (OSError, ValueError, KeyError):
        pass  # unreadable: read the records again and rewrite it
    data = cls._read_records(builder, domains)
    tmp = cache.with_name(f"{cache.stem}.tmp{os.getpid()}.npz")
    try:
      np.savez(tmp, domain_sizes=np.array([len(x) for x in data.item_ids]),
               item_ids=np.array([i for x in data.item_ids for i in x], dtype=str),
               item_texts=np.array(data.item_texts, dtype=str),
               item_tags=np.array(["|".join(t) for t in data.item_tags], dtype=str),
               user_keys=np.array(data.user_keys, dtype=str), user=data.user, domain=data.domain,
               user_tags=np.array(["|".join(t) for t in data.user_tags], dtype=str),
               item=data.item, label=data.label, order=data.order, split=data.split.astype(str))
      os.replace(tmp, cache)
    except OSError:
      tmp.unlink(missing_ok=True)  # a read-only data dir: just do not cache
    return data

  @classmethod
  def _read_records(cls, builder, domains) -> "InteractionData":
    """Parses the stored tf.train.Example records directly, reading only the fields this view
    needs: tfds's per-feature NumPy decoding of every field (profiles, histories) took ~45 s
    for Amazon Arts x Office's 245k records, this ~5 s."""
    sources = builder.as_data_source()
    names = [d["name"] for d in domains]
    per_domain = [[] for _ in names]
    texts = [[] for _ in names]
    tags = [[] for _ in names]
    for f in _raw_features(sources["items"]):
      d = names.index(_text(f, "domain"))
      per_domain[d].append(_text(f, "item_id"))
      texts[d].append(_text(f, "item_text"))
      tags[d].append(_texts(f, "item_tags"))
    columns = collections.defaultdict(list)
    user_tags = {}
    for split in _SPLITS:
      if split not in sources:
        continue
      for f in _raw_features(sources[split]):
        columns["user_key"].append(_text(f, "user_key"))
        if f["user_tags"].bytes_list.value:
          user_tags[columns["user_key"][-1]] = _texts(f, "user_tags")
        columns["domain"].append(_text(f, "domain"))
        columns["item_id"].append(_text(f, "item_id"))
        columns["label"].append(f["label"].float_list.value[0])
        columns["order"].append(f["order"].float_list.value[0])
        columns["split"].append(split)
    return cls.from_columns(domains, per_domain, texts, item_tags=tags, user_tags=user_tags,
                            **columns)

  @classmethod
  def from_columns(cls, domains, item_ids, item_texts, *, user_key, domain, item_id, label, order,
                   split, item_tags=None, user_tags=None) -> "InteractionData":
    """``user_tags``: user key -> that user's side features (optional)."""
    names = [d["name"] for d in domains]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in item_ids])])
    index = {(d, i): offsets[k] + c for k, (d, ids) in enumerate(zip(names, item_ids))
             for c, i in enumerate(ids)}
    user_keys = sorted(set(user_key))
    user_index = {k: n for n, k in enumerate(user_keys)}
    return cls(
        domains=list(domains), item_ids=[list(x) for x in item_ids],
        item_texts=[t for x in item_texts for t in x],
        item_tags=[list(t) for x in (item_tags or [[[] for _ in ids] for ids in item_ids])
                   for t in x], user_keys=user_keys,
        user=np.array([user_index[u] for u in user_key], np.int64),
        domain=np.array([names.index(d) for d in domain], np.int64),
        item=np.array([index[(d, i)] for d, i in zip(domain, item_id)], np.int64),
        label=np.asarray(label, np.float64), order=np.asarray(order, np.float64),
        split=np.asarray(split), user_tags=[list((user_tags or {}).get(k, ())) for k in user_keys])

  def only_domain(self, domain: int) -> "InteractionData":
    """The rows of one domain (the catalog is kept, so item indices do not change): what a
    single-domain model is trained on."""
    keep = self.domain == domain
    return dataclasses.replace(self, user=self.user[keep], domain=self.domain[keep],
                               item=self.item[keep], label=self.label[keep],
                               order=self.order[keep], split=self.split[keep])

  # ---------------------------------------------------------------------------------- views
  @property
  def names(self) -> list[str]:
    return [d["name"] for d in self.domains]

  @property
  def offsets(self) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(x) for x in self.item_ids])]).astype(np.int64)

  @property
  def num_items(self) -> int:
    return int(self.offsets[-1])

  @property
  def num_users(self) -> int:
    return len(self.user_keys)

  def domain_of_item(self) -> np.ndarray:
    return np.repeat(np.arange(len(self.domains)), np.diff(self.offsets))

  def task(self, d: int) -> str:
    return self.domains[d]["task"]

  def mask(self, splits: Sequence[str] = ("train",), domain: int | None = None) -> np.ndarray:
    m = np.isin(self.split, splits)
    return m if domain is None else m & (self.domain == domain)

  def train_users(self) -> np.ndarray:
    """Bool [num_users]: the user has at least one train interaction (an ID model knows them)."""
    known = np.zeros(self.num_users, bool)
    known[self.user[self.mask()]] = True
    return known

  def item_counts(self, splits=("train",)) -> np.ndarray:
    return np.bincount(self.item[self.mask(splits)], minlength=self.num_items).astype(np.float64)

  def matrix(self, splits=("train",), positive_only: bool = True) -> sp.csr_matrix:
    """Users x items (all domains side by side), binary."""
    sel = self.mask(splits) & ((self.label > 0) if positive_only else True)
    m = sp.csr_matrix((np.ones(int(sel.sum())), (self.user[sel], self.item[sel])),
                      shape=(self.num_users, self.num_items))
    m.data[:] = 1.0  # an item seen twice counts once
    return m

  def queries(self, split: str, domain: int | None = None, *,
              context: str = "before_target") -> "Queries":
    """The targets of ``split`` (optionally one domain) with their users' contexts.

    context="before_target": train/history rows strictly before the target (the profile rule);
    "all": every train/history row of the user except the target row itself (for random
    splits, where order carries no information about what was known when).
    """
    rows = np.flatnonzero(self.mask((split,), domain))
    is_context = np.flatnonzero(np.isin(self.split, CONTEXT_SPLITS))
    by_user = collections.defaultdict(list)
    for n in is_context:
      by_user[self.user[n]].append(n)
    qrows, qcols = [], []
    for k, t in enumerate(rows):
      for n in by_user.get(self.user[t], ()):
        if n == t:
          continue
        if context == "all" or self.order[n] < self.order[t]:
          qrows.append(k)
          qcols.append(self.item[n])
    ctx = sp.csr_matrix((np.ones(len(qrows)), (qrows, qcols)), shape=(len(rows), self.num_items))
    ctx.data[:] = 1.0
    known = self.train_users()
    return Queries(user=np.where(known[self.user[rows]], self.user[rows], -1),
                   domain=self.domain[rows], item=self.item[rows], label=self.label[rows],
                   context=ctx, row=rows)


@dataclasses.dataclass
class Queries:
  """Targets to score, each with the user's context (binary, all domains)."""
  user: np.ndarray        # user index, -1 when the user has no train interaction
  domain: np.ndarray
  item: np.ndarray        # global item index of the target
  label: np.ndarray
  context: sp.csr_matrix  # [n, num_items]
  row: np.ndarray         # the target's row in the InteractionData arrays (-1: not in it)
  # Users from outside the log (scoring): [n, L] history item indices, newest first, padded
  # with -1; None: the history is the log's, found through ``row``.
  history: np.ndarray | None = None

  def __len__(self):
    return len(self.item)

  def subset(self, mask) -> "Queries":
    idx = np.flatnonzero(mask)
    return Queries(self.user[idx], self.domain[idx], self.item[idx], self.label[idx],
                   self.context[idx], self.row[idx],
                   None if self.history is None else self.history[idx])


def _raw_features(source, block: int = 4096):
  """The feature maps of a tfds data source's records, in order, without tfds's decoding."""
  for start in range(0, len(source), block):
    for raw in source.data_source.__getitems__(list(range(start, min(start + block, len(source))))):
      yield tf_example_pb2.Example.FromString(raw).features.feature


def _text(features, key: str) -> str:
  return features[key].bytes_list.value[0].decode("utf-8")


def _texts(features, key: str) -> list[str]:
  return [v.decode("utf-8") for v in features[key].bytes_list.value]
