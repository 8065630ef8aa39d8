"""The interface the classical recommenders share with our model, and the tools around it.

Every model is fitted on the train split of an ``InteractionData`` and answers ``Queries``: a
score per (query, target) pair, or a score for every item of one domain (the ranking protocol of
``crossrec_jax.evaluate``: the target among all items of its domain, the user's earlier items of
that domain excluded, ties counting half). ``tune`` is the grid search on a validation split,
``holdout_split`` makes one out of train where the data has none.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from crossrec_jax import metrics, ranking
from crossrec_jax.interactions import InteractionData, Queries

_CHUNK = 1024  # query rows scored at once: bounds the [rows, N_d] intermediates


class Recommender:
  """fit -> score_pairs / score_catalog. Subclasses implement ``_fit`` and ``score_catalog``;
  ``score_pairs`` reads the target's column unless a model has a cheaper direct form."""
  name = "recommender"

  def fit(self, data: InteractionData) -> "Recommender":
    """Fits on ``data.mask(("train",))`` only; returns self."""
    self.offsets = data.offsets
    self.domains = [dict(d) for d in data.domains]
    self.num_users = data.num_users
    self._fit(data)
    return self

  def _fit(self, data: InteractionData) -> None:
    raise NotImplementedError

  def score_catalog(self, queries: Queries, domain: int) -> np.ndarray:
    """[n, N_d] float32: every item of ``domain`` for every query."""
    raise NotImplementedError

  def score_pairs(self, queries: Queries) -> np.ndarray:
    """[n]: the score of each query's own target item."""
    out = np.empty(len(queries), np.float32)
    for d in np.unique(queries.domain):
      rows = np.flatnonzero(queries.domain == d)
      for start in range(0, len(rows), _CHUNK):
        idx = rows[start:start + _CHUNK]
        scores = self.score_catalog(_take(queries, idx), int(d))
        out[idx] = scores[np.arange(len(idx)), queries.item[idx] - self.offsets[d]]
    return out

  def _columns(self, domain: int) -> slice:
    return slice(int(self.offsets[domain]), int(self.offsets[domain + 1]))


def _take(queries: Queries, idx: np.ndarray) -> Queries:
  mask = np.zeros(len(queries), bool)
  mask[idx] = True
  return queries.subset(mask)


# ------------------------------------------------------------------------------ evaluation

def domain_exclusions(queries: Queries, offsets: np.ndarray, domain: int) -> np.ndarray:
  """[n, N_d] bool: the user's earlier items of ``domain`` (the query's context there)."""
  return queries.context[:, offsets[domain]:offsets[domain + 1]].toarray() > 0


def evaluate_ranking(scores: np.ndarray, queries: Queries, data: InteractionData, domain: int,
                     k: int = 10) -> dict[str, float]:
  """HR@k, NDCG@k and AUC of each target among all items of ``domain`` (scores [n, N_d]), the
  query's earlier items of the domain excluded."""
  if not np.all(queries.domain == domain):
    raise ValueError(f"evaluate_ranking: queries of domain {domain} only")
  offsets = data.offsets
  if not len(queries):
    return {f"hr@{k}": float("nan"), f"ndcg@{k}": float("nan"), "auc": float("nan"), "n": 0}
  columns = slice(offsets[domain], offsets[domain + 1])
  return ranking.ranking_metrics(scores, queries.item - offsets[domain],
                                 queries.context[:, columns], k)


def evaluate_rating(pred: np.ndarray, queries: Queries) -> dict[str, float]:
  return {"rmse": metrics.rmse(pred, queries.label), "mae": metrics.mae(pred, queries.label),
          "n": len(queries)}


def rmse_metric(model: Recommender, queries: Queries) -> float:
  """A ``tune`` metric for rating models (mode="min")."""
  return metrics.rmse(model.score_pairs(queries), queries.label)


def ranking_metric(data: InteractionData, domain: int, name: str = "ndcg@10"
                   ) -> Callable[[Recommender, Queries], float]:
  """A ``tune`` metric for ranking models (mode="max"): ``name`` of evaluate_ranking."""
  k = int(name.split("@")[1]) if "@" in name else 10

  def metric(model: Recommender, queries: Queries) -> float:
    return evaluate_ranking(model.score_catalog(queries, domain), queries, data, domain, k)[name]
  return metric


# -------------------------------------------------------------------------------- tuning

def tune(make: Callable[..., Recommender], grid: Sequence[dict], data: InteractionData,
         valid: Queries, metric: Callable[[Recommender, Queries], float], mode: str = "max"
         ) -> tuple[dict, list[tuple[dict, float]]]:
  """Fits ``make(**params)`` on data's train split for each grid point and scores it on
  ``valid``; returns the best params (first of equals) and every (params, value)."""
  if mode not in ("max", "min"):
    raise ValueError(f"mode must be 'max' or 'min', not {mode!r}")
  if not grid:
    raise ValueError("tune: empty grid")
  results = [(dict(p), float(metric(make(**p).fit(data), valid))) for p in grid]
  sign = 1.0 if mode == "max" else -1.0
  best = max(range(len(results)), key=lambda n: (sign * results[n][1], -n))
  return results[best][0], results


def holdout_split(data: InteractionData, fraction: float = 0.1, seed: int = 0) -> InteractionData:
  """A copy of ``data`` with a random ``fraction`` of its train rows moved to "valid", for
  tuning where the data has no valid split (then refit on all of train)."""
  if np.any(data.split == "valid"):
    raise ValueError("holdout_split: the data already has a valid split; tune on that")
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"holdout_split: fraction must be in (0, 1), not {fraction}")
  train = np.flatnonzero(data.split == "train")
  held = np.random.default_rng(seed).choice(train, int(round(fraction * len(train))),
                                            replace=False)
  split = np.asarray(data.split).astype(object)
  split[held] = "valid"
  return dataclasses.replace(data, split=split.astype(str))
