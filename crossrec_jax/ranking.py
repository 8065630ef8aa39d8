"""Ranking on device, the one implementation every evaluation uses: the rank of each target
(full catalog or among sampled negatives) and top-K, in jitted blocks.

Scores arrive as [n, N] blocks (host or device arrays); the items to leave out (a user's earlier
items of the domain) as a sparse [n, N] matrix that is turned into padded index lists per block,
never into a dense float64 matrix on the host. Ties count half, so a constant scorer gets the
expected rank rather than the best one. Serving's top-K (every encoder mode) is
``streamed_top_k``: blocks of catalog columns, each reduced on device and merged.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from crossrec_jax import metrics, sharding


def _padded_indices(matrix: sp.csr_matrix, rows: slice, width_multiple: int = 8) -> np.ndarray:
  """Column indices of the non-zeros of ``matrix[rows]``, padded with -1 to a common width."""
  block = matrix[rows]
  counts = np.diff(block.indptr)
  width = max(width_multiple, -(-int(counts.max(initial=0)) // width_multiple) * width_multiple)
  out = np.full((block.shape[0], width), -1, np.int32)
  row_of = np.repeat(np.arange(block.shape[0]), counts)
  pos = np.arange(block.nnz) - np.repeat(block.indptr[:-1], counts)
  out[row_of, pos] = block.indices
  return out


def padded_indices(matrix: sp.csr_matrix) -> np.ndarray:
  """[n, W] column indices of each row's non-zeros, padded with -1 (``streamed_top_k``'s
  ``exclude``)."""
  return _padded_indices(sp.csr_matrix(matrix), slice(None))


def _exclusion_mask(n: int, num_items: int, exclude):
  mask = jnp.zeros((n, num_items), bool)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], exclude.shape)
  return mask.at[rows, jnp.where(exclude >= 0, exclude, num_items)].set(True, mode="drop")


def candidate_mask(target, exclude, num_items: int):
  """[n, N] True for the items left out of each row's ranking; the target always competes."""
  n = target.shape[0]
  excluded = _exclusion_mask(n, num_items, exclude)
  return excluded.at[jnp.arange(n), target].set(False)


def rank_with_mask(scores, target, excluded):
  """0-based rank of each row's target among the items not ``excluded`` (ties count half)."""
  scores = scores.astype(jnp.float32)
  target_score = jnp.take_along_axis(scores, target[:, None], 1)
  higher = jnp.sum((scores > target_score) & ~excluded, 1)
  ties = jnp.sum((scores == target_score) & ~excluded, 1) - 1
  return higher + 0.5 * ties


@jax.jit
def _rank_block(scores, target, exclude):
  excluded = candidate_mask(target, exclude, scores.shape[1])
  return rank_with_mask(scores, target, excluded), scores.shape[1] - jnp.sum(excluded, 1)


def row_blocks(exclude: sp.csr_matrix | None, n: int, num_items: int, block: int = 1024):
  """(rows, padded excluded indices) per block of ``block`` rows: the device rankers' input."""
  exclude = sp.csr_matrix(exclude if exclude is not None else (n, num_items))
  for start in range(0, n, block):
    rows = slice(start, min(start + block, n))
    yield rows, _padded_indices(exclude, rows)


def rank_of_targets(scores, target: np.ndarray, exclude: sp.csr_matrix | None = None,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """(0-based rank of each row's target among the row's items not in ``exclude``, number of
  those candidates); the target always competes."""
  ranks, candidates = [], []
  for rows, excluded in row_blocks(exclude, len(target), scores.shape[1], block):
    r, c = _rank_block(jnp.asarray(scores[rows]), jnp.asarray(target[rows], jnp.int32),
                       jnp.asarray(excluded))
    ranks.append(np.asarray(r))
    candidates.append(np.asarray(c))
  return _joined(ranks, candidates)


@jax.jit
def _rank_sampled_block(scores, target, negatives):
  # Column 0 is the target, then its negatives; padding (-1) is left out of the ranking.
  columns = jnp.concatenate([target[:, None], negatives], 1)
  gathered = jnp.take_along_axis(scores, jnp.maximum(columns, 0), 1)
  excluded = columns < 0
  rank = rank_with_mask(gathered, jnp.zeros_like(target), excluded)
  return rank, columns.shape[1] - jnp.sum(excluded, 1)


def rank_among_negatives(scores, target: np.ndarray, negatives: np.ndarray, block: int = 1024
                         ) -> tuple[np.ndarray, np.ndarray]:
  """The sampled protocol: (0-based rank of each row's target among itself and the row's
  ``negatives`` [n, M] (column indices, padded with -1), number of those candidates)."""
  ranks, candidates = [], []
  for start in range(0, len(target), block):
    rows = slice(start, min(start + block, len(target)))
    r, c = _rank_sampled_block(jnp.asarray(scores[rows]), jnp.asarray(target[rows], jnp.int32),
                               jnp.asarray(negatives[rows], jnp.int32))
    ranks.append(np.asarray(r))
    candidates.append(np.asarray(c))
  return _joined(ranks, candidates)


def _joined(ranks, candidates) -> tuple[np.ndarray, np.ndarray]:
  if not ranks:
    return np.zeros(0), np.zeros(0)
  return np.concatenate(ranks).astype(np.float64), np.concatenate(candidates).astype(np.float64)


def ranking_metrics(scores, target, exclude=None, k=10) -> dict[str, float]:
  """``metrics.ranking_metrics`` (``k``: one cut-off or several) of the full-catalog ranks."""
  rank, candidates = rank_of_targets(scores, target, exclude)
  return metrics.ranking_metrics(rank, candidates, k) | {"n": len(target)}


@functools.partial(jax.jit, static_argnames=("k",))
def _merge_top_k(scores, exclude, offset, best_scores, best_index, *, k: int):
  """One block of ``streamed_top_k``: the top-k of columns [offset, offset + width) with the
  ``exclude`` columns left out, merged with the running top-k (earlier blocks win ties, so
  the order is that of a stable sort on the whole row)."""
  width = scores.shape[1]
  cols = exclude - offset
  cols = jnp.where((exclude >= 0) & (cols >= 0) & (cols < width), cols, width)  # width: dropped
  rows = jnp.broadcast_to(jnp.arange(scores.shape[0])[:, None], cols.shape)
  scores = scores.astype(jnp.float32).at[rows, cols].set(-jnp.inf, mode="drop")
  block_scores, block_index = jax.lax.top_k(scores, min(k, width))
  merged = jnp.concatenate([best_scores, block_scores], 1)
  index = jnp.concatenate([best_index, offset + block_index.astype(jnp.int32)], 1)
  top, pos = jax.lax.top_k(merged, k)
  return top, jnp.take_along_axis(index, pos, 1)


def streamed_top_k(score_block, num_items: int, exclude: np.ndarray, *, k: int,
                   block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Top-``k`` (scores, column indices), each [n, k], of the rows of an [n, num_items] score
  matrix that is never formed whole: ``score_block(start, stop)`` gives its columns
  [start, stop) as an [n, stop - start] host or device array (any sharding: the reduction
  follows it); ``exclude`` [n, W] holds the columns to leave out, padded with -1 (e.g. each
  user's history; ``padded_indices``). Blocks have one width (the last is padded with -inf),
  so the kernel compiles once per shape. Fewer than ``k`` candidates: index -1, score -inf."""
  block = max(1, min(block, num_items))
  n = len(exclude)
  best_scores = jnp.full((n, k), -jnp.inf, jnp.float32)
  best_index = jnp.full((n, k), -1, jnp.int32)
  exclude = np.asarray(exclude, np.int32)
  for start in range(0, num_items, block):
    stop = min(start + block, num_items)
    scores = score_block(start, stop)
    if stop - start < block:  # one compiled shape for every block
      pad = ((0, 0), (0, block - (stop - start)))
      scores = (np.pad(scores, pad, constant_values=-np.inf) if isinstance(scores, np.ndarray)
                else jnp.pad(scores, pad, constant_values=-jnp.inf))
    best_scores, best_index = _merge_top_k(scores, exclude, np.int32(start), best_scores,
                                           best_index, k=k)
  scores, index = sharding.to_host(best_scores), sharding.to_host(best_index)
  return scores, np.where(np.isfinite(scores), index, -1)
