"""CF + deep fusion: the served score combines the neural score with item-item CF scores.

Each component's catalog scores are z-scored per user (row), so scales do not matter, and
combined with per-domain weights chosen on the validation split by NDCG@K over a small grid.
Weight 0 is in the grid, so fusion can only match or beat its best single component on valid.
Then, per domain, cold items (few train interactions: CF cannot see them) get the text path's
z-score boosted and an offset, tuned on valid the same way (``ColdItems``, ``tune_cold``).
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


def fuse(components: Mapping[str, np.ndarray], weights: Mapping[str, float],
         cold: "ColdItems | None" = None) -> jax.Array:
  """Σ_c w_c · zscore(scores_c) over the components with a non-zero weight; with ``cold``, its
  columns also get Σ_c b_c · zscore(scores_c) + offset (``ColdItems``)."""
  total = None
  for name, w in weights.items():
    if w:
      z = w * zscore_rows(jnp.asarray(components[name]))
      total = z if total is None else total + z
  if total is None:
    raise ValueError(f"fusion weights {dict(weights)} are all zero")
  if cold is not None and cold.active:
    extra = cold.offset
    for name, b in cold.boost.items():
      if b:
        extra = extra + b * zscore_rows(jnp.asarray(components[name]))
    total = total + jnp.asarray(cold.columns)[None, :] * extra
  return total


@dataclasses.dataclass
class ColdItems:
  """Fusion terms for a domain's cold items (at most ``max_train`` train interactions): the CF
  components cannot see them and the network learns popularity into its item vectors, so on
  those columns the text path (``boost``, per component) and an ``offset`` are added to the
  fused score. Tuned on valid (``tune_cold``); zero boost and offset is the plain fusion."""
  columns: np.ndarray              # [N_d] 1.0 on the domain's cold items, else 0.0
  boost: dict[str, float]
  offset: float
  max_train: int

  @property
  def active(self) -> bool:
    return bool(self.offset or any(self.boost.values())) and bool(self.columns.any())

  def to_json(self) -> dict:
    return {"boost": dict(self.boost), "offset": self.offset, "max_train": self.max_train}

  @classmethod
  def from_json(cls, saved: dict, item_counts: np.ndarray) -> "ColdItems":
    """``item_counts``: the domain's train interactions per item."""
    return cls((item_counts <= saved["max_train"]).astype(np.float32),
               {k: float(v) for k, v in saved["boost"].items()}, float(saved["offset"]),
               int(saved["max_train"]))


COLD_BOOSTS = (0.0, 0.5, 1.0, 2.0)
COLD_OFFSETS = (0.0, 0.5, 1.0, 2.0, 3.0)


@jax.jit
def _cold_grid_ranks(z, weights, boosts, offsets, columns, target, exclude):
  """[G, n] ranks under the fixed ``weights`` [C] plus, on ``columns``, each grid point's
  ``boosts`` [G, C] and ``offsets`` [G]."""
  excluded = ranking.candidate_mask(target, exclude, z.shape[2])
  base = jnp.tensordot(weights, z, 1)

  def rank(point):
    b, offset = point
    total = base + columns[None, :] * (jnp.tensordot(b, z, 1) + offset)
    return ranking.rank_with_mask(total, target, excluded)

  return jax.lax.map(rank, (boosts, offsets))


def tune_cold(components: Mapping[str, np.ndarray], weights: Mapping[str, float],
              target: np.ndarray, exclude: sp.csr_matrix | None, item_counts: np.ndarray, *,
              max_train: int, boosted: tuple[str, ...] = ("text_knn",), k: int = 10,
              metric: str | None = None, block: int = 1024) -> ColdItems | None:
  """The cold-item terms with the best valid ``metric`` over ``COLD_BOOSTS`` (for each of
  ``boosted`` present) x ``COLD_OFFSETS``, the plain fusion (all zero) included, so valid can
  only match or gain. None when the domain has no cold item or no valid target."""
  columns = (np.asarray(item_counts) <= max_train).astype(np.float32)
  if not columns.any() or not len(target):
    return None
  metric = metric or f"ndcg@{k}"
  names = list(components)
  boosted = [n for n in boosted if n in components]
  points = [(dict(zip(boosted, bs)), o) for bs in itertools.product(COLD_BOOSTS, repeat=len(boosted))
            for o in COLD_OFFSETS]
  boosts = jnp.asarray([[p[0].get(n, 0.0) for n in names] for p in points], jnp.float32)
  offsets = jnp.asarray([p[1] for p in points], jnp.float32)
  w = jnp.asarray([float(weights.get(n, 0.0)) for n in names], jnp.float32)
  ranks, candidates = [], []
  for rows, excluded in ranking.row_blocks(exclude, len(target), components[names[0]].shape[1],
                                           block):
    z = jnp.stack([zscore_rows(jnp.asarray(components[n][rows])) for n in names])
    t, e = jnp.asarray(target[rows], jnp.int32), jnp.asarray(excluded)
    ranks.append(np.asarray(_cold_grid_ranks(z, w, boosts, offsets, jnp.asarray(columns), t, e),
                            np.float64))
    candidates.append(np.asarray(z.shape[2] - jnp.sum(ranking.candidate_mask(t, e, z.shape[2]), 1),
                                 np.float64))
  rank, candidates = np.concatenate(ranks, 1), np.concatenate(candidates)
  scores = [metrics.ranking_metrics(r, candidates, k)[metric] for r in rank]
  best = int(np.argmax(scores))  # the first best: the plain fusion wins ties
  return ColdItems(columns, points[best][0], float(points[best][1]), int(max_train))


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
