"""Input pipeline: tfds data sources -> grain (shuffle, negatives, per-host shard, batch) ->
fixed-shape numpy batches of token ids, masks, domain ids, ID buckets and labels.

Item texts are tokenized once (``Catalog``); profiles are tokenized per batch. Shapes are
fixed by ``user_max_length`` / ``item_max_length`` / batch size, so jit compiles once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterator, Sequence

import grain
import jax
import numpy as np

from crossrec_jax.data.builder import decode_text

TRAIN_FIELDS = ("user_key", "domain", "domain_index", "item_id", "label", "profile", "cold",
                "user_in_train")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  batch_size: int = 32          # global, across all processes
  user_max_length: int = 128
  item_max_length: int = 32
  num_negatives: int = 1        # sampled per positive of an implicit domain (train only)
  user_buckets: int = 0
  item_buckets: int = 0
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> "PipelineConfig":
    """A run's input pipeline: batch and text lengths from ``config.data``, the hashed-ID
    buckets from ``config.model`` (the model's ID tables and the batches must agree)."""
    d, m = config.data, config.model
    return cls(batch_size=config.batch_size, user_max_length=d.user_max_length,
               item_max_length=d.item_max_length, num_negatives=d.num_negatives,
               user_buckets=m.user_buckets, item_buckets=m.item_buckets, seed=config.seed)


def stable_bucket(key: str, buckets: int) -> int:
  """Hash bucket of an ID, identical on every host and run (Python's hash() is salted)."""
  return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % buckets


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
  enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np", return_token_type_ids=False)
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


class Catalog:
  """Every item of every domain, tokenized once; rows addressed by (domain, item_id)."""

  def __init__(self, items_source, domains: Sequence[str], tokenizer, config: PipelineConfig):
    records = [items_source[i] for i in range(len(items_source))]
    records.sort(key=lambda r: (int(r["domain_index"]), decode_text(r["item_id"])))
    self.domains = tuple(domains)
    self.domain = np.array([int(r["domain_index"]) for r in records], np.int32)
    self.item_ids = [decode_text(r["item_id"]) for r in records]
    self.texts = [decode_text(r["item_text"]) or f"{self.domains[d]} item {i}"
                  for r, d, i in zip(records, self.domain, self.item_ids)]
    self.row = {(self.domains[d], i): n for n, (d, i) in enumerate(zip(self.domain, self.item_ids))}
    self.input_ids, self.attention_mask = tokenize(tokenizer, self.texts, config.item_max_length)
    in_train = np.array([bool(r["item_in_train"]) for r in records])
    self.bucket = np.array(
        [stable_bucket(f"{self.domains[d]}/{i}", config.item_buckets) if config.item_buckets and t
         else -1 for d, i, t in zip(self.domain, self.item_ids, in_train)], np.int32)
    self.rows_of_domain = [np.flatnonzero(self.domain == d) for d in range(len(self.domains))]
    # log of each item's share of its domain's training interactions: the in-batch softmax
    # subtracts it (sampling-bias correction) because batch negatives follow popularity.
    self.log_q = np.zeros(len(self.item_ids), np.float32)

  def set_train_counts(self, counts: np.ndarray) -> None:
    share = np.zeros(len(self.item_ids), np.float64)
    for rows in self.rows_of_domain:
      c = counts[rows] + 1.0  # add-one: unseen items are not -inf
      share[rows] = c / c.sum()
    self.log_q = np.log(share).astype(np.float32)

  def __len__(self):
    return len(self.item_ids)

  def rows(self, domains: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
    try:
      return np.array([self.row[(d, i)] for d, i in zip(domains, item_ids)], np.int64)
    except KeyError as e:
      raise KeyError(f"item {e.args[0][1]!r} of domain {e.args[0][0]!r} is not in the catalog") from None


class TrainSource:
  """The train split plus ``num_negatives`` sampled negatives per implicit positive.

  Index ``i < N`` is record ``i``; index ``N + k * P + p`` is the ``k``-th negative of the
  ``p``-th implicit positive: same user and profile, a uniformly drawn other item of the
  same domain, label 0. The draw is a pure function of (seed, index): resumable, deterministic.
  """

  def __init__(self, source, catalog: Catalog, implicit_domains: Sequence[int], num_negatives: int,
               seed: int):
    self.source, self.catalog, self.seed = source, catalog, seed
    self.num_negatives = num_negatives
    implicit = set(implicit_domains)
    self.positives = np.array([i for i in range(len(source))
                               if int(source[i]["domain_index"]) in implicit
                               and float(source[i]["label"]) > 0], np.int64) if num_negatives else np.zeros(0, np.int64)

  def __len__(self):
    return len(self.source) + self.num_negatives * len(self.positives)

  def __repr__(self):  # grain checks the source's repr when restoring an iterator state
    return (f"TrainSource({self.source!r}, examples={len(self.source)}, "
            f"negatives={self.num_negatives}x{len(self.positives)}, seed={self.seed})")

  def __getitem__(self, index):
    n = len(self.source)
    if index < n:
      return _decode(self.source[index])
    k, p = divmod(index - n, len(self.positives))
    record = _decode(self.source[int(self.positives[p])])
    rows = self.catalog.rows_of_domain[record["domain_index"]]
    rng = np.random.default_rng((self.seed, index))
    row = int(rows[rng.integers(len(rows))])
    if self.catalog.item_ids[row] == record["item_id"] and len(rows) > 1:
      row = int(rows[(np.searchsorted(rows, row) + 1) % len(rows)])
    return record | {"item_id": self.catalog.item_ids[row], "label": 0.0}


def _decode(record) -> dict[str, Any]:
  out = {}
  for k in TRAIN_FIELDS:
    v = record[k]
    out[k] = decode_text(v) if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
  return out


class Featurize(grain.transforms.Map):
  """A list of decoded records -> one fixed-shape numpy batch."""

  def __init__(self, catalog: Catalog, tokenizer, config: PipelineConfig, part=None):
    self.catalog, self.tokenizer, self.config, self.part = catalog, tokenizer, config, part

  def map(self, records):
    if self.part is not None:
      records = records[self.part[0]:self.part[1]]
    return featurize(records, self.catalog, self.tokenizer, self.config)


def featurize(records: Sequence[dict[str, Any]], catalog: Catalog, tokenizer,
              config: PipelineConfig, weight: np.ndarray | None = None) -> dict[str, np.ndarray]:
  user_ids, user_mask = tokenize(tokenizer, [r["profile"] for r in records], config.user_max_length)
  rows = catalog.rows([r["domain"] for r in records], [r["item_id"] for r in records])
  user_bucket = np.array(
      [stable_bucket(r["user_key"], config.user_buckets) if config.user_buckets and r["user_in_train"]
       else -1 for r in records], np.int32)
  return {
      "user_input_ids": user_ids, "user_attention_mask": user_mask,
      "item_input_ids": catalog.input_ids[rows], "item_attention_mask": catalog.attention_mask[rows],
      "user_bucket": user_bucket, "item_bucket": catalog.bucket[rows],
      "domain": np.array([r["domain_index"] for r in records], np.int32),
      "label": np.array([r["label"] for r in records], np.float32),
      "cold": np.array([bool(r["cold"]) for r in records], np.int32),
      "item_row": rows.astype(np.int32),
      "item_log_q": catalog.log_q[rows],
      "weight": np.ones(len(records), np.float32) if weight is None else weight,
  }


def train_loader(train_source, catalog: Catalog, tokenizer, config: PipelineConfig,
                 implicit_domains: Sequence[int]) -> grain.DataLoader:
  """Infinite, shuffled loader of this process's part of each global batch.

  Every process walks the same global sample order and keeps its contiguous slice of each
  global batch (records are cheap to read; only the slice is tokenized). So the global batch
  does not depend on the number of hosts: a 2-host run sees exactly the batches of a 1-host
  run. The iterator's state is checkpointable (``get_state`` / ``set_state``).
  """
  source = TrainSource(train_source, catalog, implicit_domains, config.num_negatives, config.seed)
  count, index = jax.process_count(), jax.process_index()
  per_process = config.batch_size // count
  if per_process * count != config.batch_size:
    raise ValueError(f"batch_size {config.batch_size} must divide by the process count {count}")
  sampler = grain.samplers.IndexSampler(len(source), shuffle=True, num_epochs=None, seed=config.seed)
  return grain.DataLoader(
      data_source=source, sampler=sampler, worker_count=0,
      # Records hold strings: batch them into lists, then tokenize this process's slice at once.
      operations=[grain.transforms.Batch(config.batch_size, drop_remainder=True, batch_fn=list),
                  Featurize(catalog, tokenizer, config, part=(index * per_process, (index + 1) * per_process))])


def eval_batches(source, catalog: Catalog, tokenizer, config: PipelineConfig, *,
                 batch_size: int | None = None, limit: int | None = None
                 ) -> Iterator[tuple[dict[str, np.ndarray], list[dict[str, Any]]]]:
  """Sequential global batches, the last one padded (weight 0). Every process reads the same
  batches (evaluation sets are small; each process then feeds its devices' slices).

  Yields (batch, records); records carry ``history_items`` for ranking exclusion.
  """
  batch_size = batch_size or config.batch_size
  n = len(source) if limit is None else min(limit, len(source))
  indices = np.arange(n)
  for start in range(0, len(indices), batch_size):
    chunk = indices[start:start + batch_size]
    records = []
    for i in chunk:
      raw = source[int(i)]
      record = _decode(raw)
      record["history_items"] = [decode_text(h) for h in raw["history_items"]]
      records.append(record)
    weight = np.zeros(batch_size, np.float32)
    weight[:len(records)] = 1.0
    padded = records + [records[-1]] * (batch_size - len(records))
    yield featurize(padded, catalog, tokenizer, config, weight), records
