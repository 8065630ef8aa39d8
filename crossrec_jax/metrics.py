"""Rating and ranking metrics (numpy, host side): RMSE, MAE; and from each target's rank (see
``crossrec_jax.ranking``, ties counted half): HR@K, NDCG@K, Recall@K, MRR@K and AUC."""

from __future__ import annotations

from typing import Sequence

import numpy as np

RATING_METRICS = ("rmse", "mae")  # errors: lower is better (a best_metric of these is minimised)
RANKING_METRICS = ("hr", "ndcg", "recall", "mrr")  # each at every K, e.g. "ndcg@10"; and "auc"


def rmse(pred, label) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(pred) - np.asarray(label)))))


def mae(pred, label) -> float:
  return float(np.mean(np.abs(np.asarray(pred) - np.asarray(label))))


def per_target_hits(rank: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """(hit, NDCG) of each target at cutoff ``k``: the terms HR@k and NDCG@k average, and what a
  paired comparison of two rankers differences target by target. A tied (half) rank is placed
  at its floor, the best place it shares."""
  rank = np.asarray(rank, np.float64)
  hit = rank < k
  return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(np.floor(rank) + 2.0), 0.0)


def ranking_metrics(rank: np.ndarray, candidates: np.ndarray, k: int | Sequence[int] = 10,
                    users: np.ndarray | None = None) -> dict[str, float]:
  """HR, NDCG, Recall and MRR at each cut-off of ``k`` (one or several), and AUC.

  ``rank``: each target's 0-based rank among its ``candidates`` (one target per query). HR@K,
  NDCG@K and MRR@K average over targets. Recall@K is RecBole's, over the held-out items of each
  user: per user, the share of that user's targets ranked in the top K, averaged over users
  (``users``: each target's user). With one target per user, or ``users=None`` (every target
  its own user), Recall@K equals HR@K.
  """
  rank, candidates = np.asarray(rank, np.float64), np.asarray(candidates, np.float64)
  out = {}
  for cut in ([k] if np.isscalar(k) else k):
    hit, ndcg = per_target_hits(rank, cut)
    out[f"hr@{cut}"] = float(hit.mean())
    out[f"ndcg@{cut}"] = float(ndcg.mean())
    out[f"recall@{cut}"] = _per_user_mean(hit, users)
    out[f"mrr@{cut}"] = float(np.where(hit > 0, 1.0 / (np.floor(rank) + 1.0), 0.0).mean())
  out["auc"] = float(np.mean(1.0 - rank / np.maximum(candidates - 1.0, 1.0)))
  return out


def _per_user_mean(values: np.ndarray, users: np.ndarray | None) -> float:
  if users is None:
    return float(values.mean())
  _, group = np.unique(np.asarray(users), return_inverse=True)
  per_user = np.bincount(group, values) / np.bincount(group)
  return float(per_user.mean())


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """Mean of ``a - b`` over the same targets and its standard error."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
