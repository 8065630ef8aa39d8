"""CF + deep fusion: the served score combines the neural score with item-item CF scores.

Each component's catalog scores are z-scored per user (row), so scales do not matter, and
combined with per-domain weights chosen on the validation split by NDCG@K over a small grid.
Weight 0 is in the grid, so fusion can only match or beat its best single component on valid.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from crossrec_jax import metrics, ranking

DEFAULT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)


@jax.jit
def zscore_rows(scores):
  """Per-row z-scores. Items a model cannot score (e.g. EASE's float32-minimum for items
  without train interactions, anything below -1e30) are left out of the mean and std and
  placed just below the row's lowest scored item."""
  scores = scores.astype(jnp.float32)
  scored = scores > -1e30
  n = jnp.maximum(scored.sum(1, keepdims=True), 1)
  mean = jnp.where(scored, scores, 0.0).sum(1, keepdims=True) / n
  var = jnp.where(scored, (scores - mean) ** 2, 0.0).sum(1, keepdims=True) / n
  z = (scores - mean) / jnp.maximum(jnp.sqrt(var), 1e-6)
  floor = jnp.where(scored, z, jnp.inf).min(1, keepdims=True) - 1.0
  return jnp.where(scored, z, jnp.where(jnp.isfinite(floor), floor, 0.0))


def fuse(components: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> jax.Array:
  """Σ_c w_c · zscore(scores_c) over the components with a non-zero weight."""
  total = None
  for name, w in weights.items():
    if w:
      z = w * zscore_rows(jnp.asarray(components[name]))
      total = z if total is None else total + z
  if total is None:
    raise ValueError(f"fusion weights {dict(weights)} are all zero")
  return total


@dataclasses.dataclass
class FusionWeights:
  """Per-domain weights; ``tuning`` keeps the valid metric of every grid point tried."""
  weights: dict[int, dict[str, float]]
  tuning: dict[int, list[tuple[dict[str, float], float]]] = dataclasses.field(default_factory=dict)

  def scores(self, components: Mapping[str, np.ndarray], domain: int) -> np.ndarray:
    return np.asarray(fuse(components, self.weights[domain]))


@jax.jit
def _grid_ranks(z, weights, target, exclude):
  """[G, n] rank of each row's target under each weight vector of ``weights`` [G, C];
  ``z`` [C, n, N] the components' z-scores. Components are summed in order, as ``fuse`` does."""
  excluded = ranking.candidate_mask(target, exclude, z.shape[2])

  def rank(w):
    total = w[0] * z[0]
    for c in range(1, z.shape[0]):
      total = total + w[c] * z[c]
    return ranking.rank_with_mask(total, target, excluded)

  return jax.lax.map(rank, weights), z.shape[2] - jnp.sum(excluded, 1)


def tune_weights(components: Mapping[str, np.ndarray], target: np.ndarray,
                 exclude: sp.csr_matrix | None, *, grid=DEFAULT_GRID, k: int = 10,
                 metric: str | None = None, block: int = 1024) -> tuple[dict[str, float], list]:
  """The grid point of per-component weights with the best valid ``metric`` (NDCG@k). Every
  grid point is ranked on device in one jitted call per block of rows."""
  metric = metric or f"ndcg@{k}"
  names = list(components)
  points, seen = [], set()
  for ws in itertools.product(grid, repeat=len(names)):
    if not any(ws):
      continue
    direction = tuple(round(w / max(ws), 6) for w in ws)  # proportional weights rank alike
    if direction not in seen:
      seen.add(direction)
      points.append(ws)
  weights = jnp.asarray(points, jnp.float32)
  ranks, candidates = [], []
  for rows, excluded in ranking.row_blocks(exclude, len(target), components[names[0]].shape[1],
                                           block):
    z = jnp.stack([zscore_rows(jnp.asarray(components[n][rows])) for n in names])
    r, c = _grid_ranks(z, weights, jnp.asarray(target[rows], jnp.int32), jnp.asarray(excluded))
    ranks.append(np.asarray(r, np.float64))
    candidates.append(np.asarray(c, np.float64))
  rank, candidates = np.concatenate(ranks, 1), np.concatenate(candidates)
  tried = [(dict(zip(names, ws)), metrics.ranking_metrics(r, candidates, k)[metric])
           for ws, r in zip(points, rank)]
  best = max(tried, key=lambda x: x[1])[0]
  return best, tried
