"""Full-catalog ranking on device: the rank of each target and top-K, in jitted blocks.

Scores arrive as [n, N] blocks (host or device arrays); the items to leave out (a user's earlier
items of the domain) as a sparse [n, N] matrix that is turned into padded index lists per block,
never into a dense float64 matrix on the host. Ties count half, so a constant scorer gets the
expected rank rather than the best one. ``crossrec_jax.score``'s top-K uses ``masked_top_k``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from crossrec_jax import metrics


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
  """[n, W] column indices of each row's non-zeros, padded with -1 (``masked_top_k``'s input)."""
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
  """(0-based rank of each row's target, number of candidates), as ``metrics.rank_of_target``."""
  ranks, candidates = [], []
  for rows, excluded in row_blocks(exclude, len(target), scores.shape[1], block):
    r, c = _rank_block(jnp.asarray(scores[rows]), jnp.asarray(target[rows], jnp.int32),
                       jnp.asarray(excluded))
    ranks.append(np.asarray(r))
    candidates.append(np.asarray(c))
  if not ranks:
    return np.zeros(0), np.zeros(0)
  return np.concatenate(ranks).astype(np.float64), np.concatenate(candidates).astype(np.float64)


def ranking_metrics(scores, target, exclude=None, k: int = 10) -> dict[str, float]:
  rank, candidates = rank_of_targets(scores, target, exclude)
  return metrics.ranking_metrics(rank, candidates, k) | {"n": len(target)}


@functools.partial(jax.jit, static_argnames=("k",))
def masked_top_k(scores, exclude, *, k: int):
  """Top-k (values, column indices) of each row with the ``exclude`` columns (padded -1) left
  out; the building block of streamed top-K over a catalog."""
  excluded = _exclusion_mask(scores.shape[0], scores.shape[1], exclude)
  return jax.lax.top_k(jnp.where(excluded, -jnp.inf, scores.astype(jnp.float32)), k)
