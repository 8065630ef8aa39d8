"""Content-based item-kNN on frozen-encoder text vectors: the one classical model that scores
items with no train interaction, where item-item CF is blind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from crossrec_jax import ranking
from crossrec_jax.baselines.base import Recommender


@jax.jit
def _similarity(block, candidates):
  return block @ candidates.T


class TextKNN(Recommender):
  """score(u, j) = Σ_{i ∈ context(u)} max(0, cos(text_i, text_j)) over the k items most similar
  to j (any domain), with text vectors centred over the catalog. Needs no interaction with j,
  so items with few or no train interactions are ranked by what their text says."""
  name = "text-kNN (content)"

  def __init__(self, vectors: np.ndarray, k: int = 50, block: int = 2048,
               column_block: int = 32768):
    # Memory is one [block, column_block] similarity block, whatever the catalog's size.
    self.vectors, self.k, self.block, self.column_block = vectors, k, block, column_block

  def _fit(self, data):
    if len(self.vectors) != data.num_items:
      raise ValueError(f"TextKNN: {len(self.vectors)} text vectors for {data.num_items} items")
    v = self.vectors - self.vectors.mean(0)
    v = jnp.asarray(v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12), jnp.float32)
    n, k = data.num_items, min(self.k, data.num_items - 1)
    sims, neighbours = [], []
    for start in range(0, n, self.block):
      rows = np.arange(start, min(start + self.block, n))
      padded = np.concatenate([rows, np.full(self.block - len(rows), rows[-1])])  # one shape
      queries = v[padded]
      top, idx = ranking.streamed_top_k(lambda lo, hi: _similarity(queries, v[lo:hi]), n,
                                        padded[:, None], k=k, block=self.column_block)
      sims.append(top[:len(rows)])
      neighbours.append(idx[:len(rows)])
    sim = np.maximum(np.concatenate(sims), 0.0).ravel()
    # Column j holds the neighbours of candidate j: context @ S[:, j] sums over them.
    self.similarity = sp.csc_matrix(
        (sim, np.concatenate(neighbours).ravel(), np.arange(0, n * k + 1, k)), shape=(n, n))

  def score_catalog(self, queries, domain):
    sim = self.similarity[:, self._columns(domain)]
    return np.asarray((queries.context.astype(np.float32) @ sim).todense(), np.float32)
