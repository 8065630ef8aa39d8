"""Rating and ranking metrics (numpy, host side): RMSE, MAE, AUC, HR@K, NDCG@K."""

from __future__ import annotations

import numpy as np

RATING_METRICS = ("rmse", "mae")  # errors: lower is better (a best_metric of these is minimised)


def rmse(pred, label) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(pred) - np.asarray(label)))))


def mae(pred, label) -> float:
  return float(np.mean(np.abs(np.asarray(pred) - np.asarray(label))))


def rank_of_target(scores: np.ndarray, target: np.ndarray, exclude: np.ndarray | None = None):
  """0-based rank of each row's target column among the non-excluded columns.

  Ties count half (so a constant scorer gets the expected rank, not the best one). Returns
  (rank, number of candidates). The target is never excluded.
  """
  scores = np.asarray(scores, np.float64)
  rows = np.arange(scores.shape[0])
  target_score = scores[rows, target]
  valid = np.ones_like(scores, bool) if exclude is None else ~exclude
  valid[rows, target] = True
  higher = np.sum((scores > target_score[:, None]) & valid, axis=1)
  ties = np.sum((scores == target_score[:, None]) & valid, axis=1) - 1
  return higher + 0.5 * ties, valid.sum(axis=1)


def per_target_hits(rank: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """(hit, NDCG) of each target at cutoff ``k``: the terms HR@k and NDCG@k average, and what a
  paired comparison of two rankers differences target by target."""
  rank = np.asarray(rank, np.float64)
  hit = rank < k
  return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(np.floor(rank) + 2.0), 0.0)


def ranking_metrics(rank: np.ndarray, candidates: np.ndarray, k: int = 10) -> dict[str, float]:
  rank, candidates = np.asarray(rank, np.float64), np.asarray(candidates, np.float64)
  hit, ndcg = per_target_hits(rank, k)
  auc = 1.0 - rank / np.maximum(candidates - 1.0, 1.0)
  return {f"hr@{k}": float(hit.mean()), f"ndcg@{k}": float(ndcg.mean()), "auc": float(auc.mean())}


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean of ``a - b`` over the same targets and its standard error."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
