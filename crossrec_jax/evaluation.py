"""One evaluator: any model through one interface, ranked on device (``crossrec_jax.ranking``),
next to the same baseline rows, with cold-user and cold-item slices, at every K of
``config.eval.ks``, under the full-catalog protocol and, with ``config.eval.sampled_negatives``
> 0, the sampled one too.

  results = evaluate_model(model, data, "test", config)   # frozen and tune runs
  print(format_table(results))

(benchmarks/bench_quality.py ranks its score matrices with the same ``sample_negatives`` and
``rank_scores``.)

``results`` holds one flat dict per slice: "music", "music/cold_users" (users unknown to
training), "music/cold_items" (targets with at most ``eval.cold_item_max_train`` train
interactions), and under the sampled protocol "music/sampled", "music/sampled/cold_users", ...
Each has "n", our metrics ("rmse", "mae" on rating domains; "hr@K", "ndcg@K", "recall@K",
"mrr@K", "auc" on implicit ones) and every baseline row's as "ROW_METRIC": "baseline_" is the
reference baseline (item mean on rating domains, popularity on implicit ones), then the model's
fitted CF components where it has them (``ServedModel.cf``: "item_knn_", "ease_", "text_knn_").

Protocols. Full catalog: each target among all items of its domain, the user's earlier items
there excluded. Sampled (papers rank against 99 or 999): each target among ``sampled_negatives``
items of its domain drawn uniformly without replacement, leaving out every item the user has in
the log (any split) and the target; drawn once from ``eval.seed``, so every model ranked in a
run meets the same negatives. Ties count half in both.

End-to-end runs (the two-tower model, tfds records) go through ``Evaluator``: the same ranking,
metrics, item mean, slices and table.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
import scipy.sparse as sp

from crossrec_jax import baselines as bl
from crossrec_jax import config_defaults, ranking, sharding, text_cache
from crossrec_jax import metrics as metrics_lib
from crossrec_jax.data import pipeline
from crossrec_jax.interactions import InteractionData, Queries
from crossrec_jax.training import steps

OURS = ""  # the row of the model being evaluated: its metrics carry no prefix
ROW_LABELS = {OURS: "ours", "baseline": "popularity", "item_knn": "item-kNN", "ease": "EASE",
              "text_knn": "text-kNN"}
_CHUNK = 2048  # queries scored at once: bounds the [rows, N_d] score blocks of every row
_NAME = 26     # the table's slice column


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  ks: tuple[int, ...]
  sampled_negatives: int      # per target; 0: the full-catalog protocol only
  seed: int                   # of the sampled negatives
  cold_item_max_train: int    # a target item with at most this many train interactions is cold

  @classmethod
  def from_config(cls, config=None) -> "EvalSettings":
    """``config.eval`` of a run config; None: the defaults (``config_defaults``)."""
    e = (config if config is not None else config_defaults.base_config()).eval
    return cls(tuple(int(k) for k in e.ks), int(e.sampled_negatives), int(e.seed),
               int(e.cold_item_max_train))


# ------------------------------------------------------------------------------------- protocol

def draw_negatives(avoid: sp.csr_matrix, count: int, rng: np.random.Generator,
                   block: int = 1024) -> np.ndarray:
  """[n, count] columns per row of ``avoid`` [n, N], uniform without replacement among the
  row's columns not in ``avoid``, padded with -1 where fewer are left. The draws depend on the
  rows' order and ``rng`` only (not on ``block``)."""
  n, size = avoid.shape
  take = min(count, size)
  out = np.full((n, count), -1, np.int32)
  if not take:
    return out
  for start in range(0, n, block):
    rows = slice(start, min(start + block, n))
    keys = rng.random((rows.stop - rows.start, size))  # row-major: the same stream per row
    keys[avoid[rows].toarray() > 0] = np.inf
    # The `take` smallest iid uniform keys among the allowed columns: a uniform subset.
    picked = np.argpartition(keys, take - 1, axis=1)[:, :take]
    picked = np.where(np.isfinite(np.take_along_axis(keys, picked, 1)), picked, size)
    picked.sort(axis=1)
    out[rows, :take] = np.where(picked < size, picked, -1)
  return out


def sample_negatives(data: InteractionData, queries: Queries, domain: int, count: int,
                     seed: int) -> np.ndarray:
  """The sampled protocol's negatives of ``queries`` (targets of ``domain``, from the log):
  [n, count] columns of the domain, none the query's user has interacted with in any split."""
  if np.any(queries.row < 0):
    raise ValueError("sample_negatives: the queries must come from data.queries (rows of the log)")
  lo, hi = int(data.offsets[domain]), int(data.offsets[domain + 1])
  sel = data.domain == domain
  owned = sp.csr_matrix((np.ones(int(sel.sum())), (data.user[sel], data.item[sel] - lo)),
                        shape=(data.num_users, hi - lo))
  avoid = owned[data.user[queries.row]] + queries.context[:, lo:hi] + _one_hot(
      queries.item - lo, hi - lo)
  return draw_negatives(avoid.tocsr(), count, np.random.default_rng([seed, domain]))


def _one_hot(columns: np.ndarray, size: int) -> sp.csr_matrix:
  return sp.csr_matrix((np.ones(len(columns)), (np.arange(len(columns)), columns)),
                       shape=(len(columns), size))


def rank_scores(scores, target: np.ndarray, exclude: sp.csr_matrix | None,
                negatives: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """(rank, candidates) of each target under each protocol: "full" (``exclude`` left out) and,
  with ``negatives``, "sampled"."""
  out = {"full": ranking.rank_of_targets(scores, target, exclude)}
  if negatives is not None:
    out["sampled"] = ranking.rank_among_negatives(scores, target, negatives)
  return out


def ranking_entries(name: str, ranks: dict[str, dict[str, tuple]], slices, users,
                    settings: EvalSettings) -> dict[str, dict[str, float]]:
  """The result dicts of one implicit domain. ``ranks``: row -> ``rank_scores`` of all its
  targets; ``slices``: (suffix, bool mask) pairs; ``users``: each target's user (Recall@K)."""
  out = {}
  for protocol in next(iter(ranks.values())):
    prefix = "" if protocol == "full" else "/sampled"
    for suffix, sel in slices:
      entry = {"n": int(sel.sum())}
      if protocol == "sampled":
        entry["negatives"] = settings.sampled_negatives
      for row, per in ranks.items():
        rank, candidates = per[protocol]
        values = metrics_lib.ranking_metrics(rank[sel], candidates[sel], settings.ks, users[sel])
        entry |= {(f"{row}_{k}" if row != OURS else k): v for k, v in values.items()}
      out[name + prefix + suffix] = entry
  return out


def rating_entries(name: str, pred: np.ndarray, baseline: np.ndarray | None, label: np.ndarray,
                   slices) -> dict[str, dict[str, float]]:
  """The result dicts of one rating domain; ``baseline``: the item mean's predictions."""
  out = {}
  for suffix, sel in slices:
    entry = {"n": int(sel.sum()), "rmse": metrics_lib.rmse(pred[sel], label[sel]),
             "mae": metrics_lib.mae(pred[sel], label[sel])}
    if baseline is not None:
      entry |= {"baseline_rmse": metrics_lib.rmse(baseline[sel], label[sel]),
                "baseline_mae": metrics_lib.mae(baseline[sel], label[sel])}
    out[name + suffix] = entry
  return out


def _slices(cold_users: np.ndarray, cold_items: np.ndarray | None):
  every = np.ones(len(cold_users), bool)
  pairs = [("", every), ("/cold_users", cold_users)]
  if cold_items is not None:
    pairs.append(("/cold_items", cold_items))
  return [(suffix, sel) for suffix, sel in pairs if sel.any()]


# ------------------------------------------------------------------------- the hybrid model

def evaluate_model(model, data: InteractionData, split: str, config=None
                   ) -> dict[str, dict[str, float]]:
  """Per domain of ``data`` with ``split`` targets: ``model`` (``score_pairs`` /
  ``score_catalog`` like ``crossrec_jax.baselines``) next to the baseline rows, every slice and
  protocol (module docstring). ``config``: the run config (its ``eval``); None: the defaults."""
  settings = EvalSettings.from_config(config)
  counts = data.item_counts()
  results, fitted = {}, {}
  for d, spec in enumerate(data.domains):
    if not data.mask((split,), d).any():
      continue
    q = data.queries(split, d)
    slices = _slices(q.user < 0, counts[q.item] <= settings.cold_item_max_train)
    if spec["task"] == "rating":
      if "item_mean" not in fitted:
        fitted["item_mean"] = bl.ItemMean().fit(data)
      pred = np.clip(model.score_pairs(q), spec["min_rating"], spec["max_rating"])
      results |= rating_entries(spec["name"], pred, fitted["item_mean"].score_pairs(q), q.label,
                                slices)
      continue
    if "popularity" not in fitted:
      fitted["popularity"] = bl.Popularity().fit(data)
    rows = {OURS: model, "baseline": fitted["popularity"]} | dict(getattr(model, "cf", {}))
    negatives = (sample_negatives(data, q, d, settings.sampled_negatives, settings.seed)
                 if settings.sampled_negatives else None)
    ranks = {row: _rank_queries(m.score_catalog, q, d, data.offsets, negatives)
             for row, m in rows.items()}
    results |= ranking_entries(spec["name"], ranks, slices, data.user[q.row], settings)
  return results


def _rank_queries(score_catalog: Callable, q: Queries, d: int, offsets, negatives):
  """``rank_scores`` of every query, scored ``_CHUNK`` queries at a time."""
  cols = slice(int(offsets[d]), int(offsets[d + 1]))
  parts = []
  for start in range(0, len(q), _CHUNK):
    chunk = np.zeros(len(q), bool)
    chunk[start:start + _CHUNK] = True
    sub = q.subset(chunk)
    parts.append(rank_scores(score_catalog(sub, d), sub.item - cols.start, sub.context[:, cols],
                             None if negatives is None else negatives[chunk]))
  return {p: tuple(np.concatenate([part[p][i] for part in parts]) for i in range(2))
          for p in parts[0]}


# ---------------------------------------------------------------------- the end-to-end model

class Evaluator:
  """End-to-end runs: encodes the catalog once per call, then scores every eval example
  against it; ranks, slices and tabulates as ``evaluate_model``."""

  def __init__(self, graphdef, mesh, catalog: pipeline.Catalog, tokenizer, pipe_config,
               model_config, *, settings: EvalSettings | None = None,
               batch_size: int | None = None):
    self.mesh, self.catalog, self.tokenizer = mesh, catalog, tokenizer
    self.pipe_config, self.model_config = pipe_config, model_config
    self.settings = settings or EvalSettings.from_config()
    n_dev = mesh.devices.size
    self.batch_size = max(n_dev, ((batch_size or pipe_config.batch_size) // n_dev) * n_dev)
    _, encode_items, predict, project_items, project_users = steps.make_encode_fns(graphdef)
    rep = sharding.replicated(mesh)
    self._encode_items = jax.jit(encode_items, out_shardings=rep)
    self._predict = jax.jit(predict, out_shardings=rep)
    self._project_items = jax.jit(project_items, out_shardings=rep)
    self._project_users = jax.jit(project_users, out_shardings=rep)

  def item_vectors(self, params) -> np.ndarray:
    c = self.catalog
    forward = lambda ids, mask, bucket: sharding.to_host(self._encode_items(
        params, *sharding.global_from_full_batch(
            {"ids": ids, "mask": mask, "bucket": bucket}, self.mesh).values()))
    tokens = [row[m > 0] for row, m in zip(c.input_ids, c.attention_mask)]
    return text_cache.encode_in_batches(forward, tokens, self.model_config.dim, self.batch_size,
                                        width=lambda n: c.input_ids.shape[1],
                                        extra={"bucket": c.bucket})

  def predictions(self, params, source, limit=None):
    """Per-example predictions and the records they belong to."""
    preds, records = collections.defaultdict(list), []
    for batch, recs in pipeline.eval_batches(source, self.catalog, self.tokenizer, self.pipe_config,
                                             batch_size=self.batch_size, limit=limit):
      out = self._predict(params, sharding.global_from_full_batch(batch, self.mesh))
      n = len(recs)
      for key in ("rating", "logit", "user"):
        preds[key].append(sharding.to_host(out[key])[:n])
      preds["item_row"].append(batch["item_row"][:n])
      records.extend(recs)
    return {k: np.concatenate(v) for k, v in preds.items()}, records

  def evaluate(self, params, source, *, limit=None, baselines: "Baselines | None" = None
               ) -> dict[str, dict[str, float]]:
    """``baselines`` adds their rows and the cold-item slice (it knows the train counts)."""
    preds, records = self.predictions(params, source, limit)
    item_vecs = None
    results = {}
    domain_of = np.array([r["domain_index"] for r in records])
    cold_users = np.array([not r["user_in_train"] for r in records])
    labels = np.array([r["label"] for r in records], np.float64)
    users = np.array([r["user_key"] for r in records])
    for d, spec in enumerate(self.model_config.domains):
      idx = np.flatnonzero(domain_of == d)
      if not len(idx):
        continue
      recs, item_rows = [records[i] for i in idx], preds["item_row"][idx]
      cold_items = None if baselines is None else (
          baselines.popularity[item_rows] <= self.settings.cold_item_max_train)
      slices = _slices(cold_users[idx], cold_items)
      if spec.task == "rating":
        base = baselines.item_mean(recs) if baselines is not None else None
        results |= rating_entries(spec.name, preds["rating"][idx], base, labels[idx], slices)
        continue
      if item_vecs is None:
        item_vecs = self.item_vectors(params)
      scores = self._domain_scores(params, d, preds["user"][idx], item_vecs)
      target, exclude = self._targets(d, recs, item_rows)
      negatives = None
      if self.settings.sampled_negatives:
        negatives = draw_negatives((exclude + _one_hot(target, scores.shape[1])).tocsr(),
                                   self.settings.sampled_negatives,
                                   np.random.default_rng([self.settings.seed, d]))
      ranks = {OURS: rank_scores(scores, target, exclude, negatives)}
      if baselines is not None:
        pop = np.broadcast_to(baselines.popularity[self.catalog.rows_of_domain[d]], scores.shape)
        ranks["baseline"] = rank_scores(pop, target, exclude, negatives)
      results |= ranking_entries(spec.name, ranks, slices, users[idx], self.settings)
    return results

  def _domain_scores(self, params, d, users, item_vecs):
    rows = self.catalog.rows_of_domain[d]
    item_proj = sharding.to_host(self._project_items(params, item_vecs[rows]))[:, d]   # [N_d, R]
    user_proj = sharding.to_host(self._project_users(params, users))[:, d]            # [n, R]
    return user_proj @ item_proj.T

  def _targets(self, d, records, item_rows) -> tuple[np.ndarray, sp.csr_matrix]:
    """Each target's column in its domain and the [n, N_d] earlier items of the domain."""
    rows = self.catalog.rows_of_domain[d]
    position = {int(r): i for i, r in enumerate(rows)}
    target = np.array([position[int(r)] for r in item_rows])
    domain = self.model_config.domains[d].name
    pairs = {(i, position[row]) for i, rec in enumerate(records)
             for row in (self.catalog.row.get((domain, h)) for h in rec.get("history_items", ()))
             if row is not None}
    r, c = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    return target, sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(records), len(rows)))


class Baselines:
  """End-to-end runs: item mean ratings (shrunk as ``baselines.ItemMean``) and item popularity
  from the train split, per catalog row."""

  def __init__(self, catalog: pipeline.Catalog, counts: np.ndarray, label_sums: np.ndarray):
    """``counts`` / ``label_sums``: train interactions and their label sum per catalog row."""
    self.catalog = catalog
    self.domain_mean = np.zeros(len(catalog.domains))
    for d, rows in enumerate(catalog.rows_of_domain):
      self.domain_mean[d] = label_sums[rows].sum() / max(counts[rows].sum(), 1)
    self.mean = bl.shrunk_item_means(label_sums, counts, self.domain_mean[catalog.domain])
    self.popularity = counts

  def item_mean(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([self.mean[self.catalog.row[(r["domain"], r["item_id"])]] for r in records])


# ---------------------------------------------------------------------------------- the table

def format_table(results: dict[str, dict[str, float]]) -> str:
  """Rating slices one line each; ranking slices one line per row (ours, then the baselines),
  under a heading that names the protocol."""
  lines, protocol = [], "none yet"  # a ranking slice's "negatives", None: full catalog
  for name, m in results.items():
    if "rmse" in m:
      nan = float("nan")
      lines.append(f"  {name:<{_NAME}} n={m['n']:<6} RMSE {m['rmse']:.4f} (item mean "
                   f"{m.get('baseline_rmse', nan):.4f})  MAE {m['mae']:.4f} (item mean "
                   f"{m.get('baseline_mae', nan):.4f})")
      continue
    ks = sorted({int(k.split("@")[1]) for k in m if k.startswith("hr@")})
    if m.get("negatives") != protocol:
      protocol = m.get("negatives")
      lines.append(_protocol_heading(protocol))
      lines.append(f"  {'slice':<{_NAME}} {'n':<8} {'row':<12}" + "".join(
          f" {'HR@' + str(k):>7} {'NDCG@' + str(k):>8} {'Rec@' + str(k):>7} {'MRR@' + str(k):>7}"
          for k in ks) + f" {'AUC':>7}")
    for i, row in enumerate(_rows_of(m, ks[0])):
      p = "" if row == OURS else f"{row}_"
      get = lambda key: m.get(key, float("nan"))  # a metric a row lacks prints as nan
      cells = "".join(f" {get(f'{p}hr@{k}'):7.4f} {get(f'{p}ndcg@{k}'):8.4f} "
                      f"{get(f'{p}recall@{k}'):7.4f} {get(f'{p}mrr@{k}'):7.4f}" for k in ks)
      head = f"{name:<{_NAME}} {m['n']:<8}" if i == 0 else " " * (_NAME + 9)
      lines.append(f"  {head} {ROW_LABELS.get(row, row):<12}{cells} {m.get(p + 'auc', float('nan')):7.4f}")
  return "\n".join(lines)


def _protocol_heading(negatives) -> str:
  if negatives is None:
    return ("  full-catalog ranking: each target among all items of its domain, the user's "
            "earlier items there excluded; ties count half")
  return (f"  sampled ranking: each target among {negatives} negatives of its domain (uniform, "
          "the user's own items left out, drawn once from config.eval.seed); ties count half")


def _rows_of(m: dict, k: int) -> list[str]:
  """The rows of a ranking slice in table order: ours, the reference baseline, the others."""
  suffix = f"hr@{k}"
  rows = [key[:-len(suffix) - 1] for key in m if key.endswith("_" + suffix)]
  return [OURS] + sorted(rows, key=lambda r: (r != "baseline", r))
