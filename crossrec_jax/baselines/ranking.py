"""Ranking baselines: popularity, item-kNN over the whole cross-domain history, EASE per
domain, and an ID-only matrix factorisation trained with BPR."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
import scipy.sparse as sp

from crossrec_jax import errors
from crossrec_jax.baselines.base import Recommender
from crossrec_jax.interactions import InteractionData

# Items EASE could not model (no train interaction) rank below everything it scored.
LOWEST_SCORE = float(np.finfo(np.float32).min)


class Popularity(Recommender):
  """Train interactions per item: the score every personalised model has to beat."""
  name = "popularity"

  def _fit(self, data):
    self.counts = data.item_counts(("train",)).astype(np.float32)

  def score_catalog(self, queries, domain):
    counts = self.counts[self._columns(domain)]
    return np.broadcast_to(counts, (len(queries), len(counts))).copy()

  def score_pairs(self, queries):
    return self.counts[queries.item].copy()


# -------------------------------------------------------------------------------- item-kNN

@dataclasses.dataclass
class ItemCooccurrence:
  """c_ij (train users with both items, zero diagonal, CSC) and n_i, all domains side by side.

  Computed once per data set; ``similarity(k, shrink)`` re-prunes it cheaply, so a grid over
  (k, shrink) shares one co-occurrence (pass it to ``ItemKNN(cooccurrence=...)``).
  """
  counts: sp.csc_matrix
  users_per_item: np.ndarray
  num_train: int           # train interactions it was computed from (a stale-use check)

  @classmethod
  def from_data(cls, data: InteractionData) -> "ItemCooccurrence":
    X = data.matrix(("train",)).astype(np.float32)
    counts = (X.T @ X).tocsc()
    counts.setdiag(0.0)
    counts.eliminate_zeros()
    counts.sort_indices()
    users = np.asarray(X.sum(0), np.float64).ravel()
    return cls(counts, users, int(data.mask(("train",)).sum()))

  def __post_init__(self):
    self._order_by_shrink = {}

  def similarity(self, k: int, shrink: float) -> sp.csc_matrix:
    """sim(i, j) = c_ij / (sqrt(n_i n_j) + shrink), keeping the k largest of each column j."""
    c = self.counts
    col = np.repeat(np.arange(c.shape[1]), np.diff(c.indptr))
    n = self.users_per_item
    sim = c.data.astype(np.float64) / (np.sqrt(n[c.indices] * n[col]) + shrink)
    if shrink not in self._order_by_shrink:  # within each column: largest first, then row
      self._order_by_shrink[shrink] = np.lexsort((c.indices, -sim, col))
    order = self._order_by_shrink[shrink]
    keep = order[np.arange(len(order)) - c.indptr[col] < k]  # col[order] == col: sorted by col
    indptr = np.concatenate([[0], np.cumsum(np.minimum(np.diff(c.indptr), k))])
    return sp.csc_matrix((sim[keep].astype(np.float32), c.indices[keep], indptr), shape=c.shape)


class ItemKNN(Recommender):
  """Item-based kNN: score(u, j) = sum of sim(i, j) over the user's context items i, which span
  every domain, so a user with no train interaction (or none in this domain) is still scored."""
  name = "item-kNN (cross-domain history)"

  def __init__(self, k: int = 100, shrink: float = 10.0,
               cooccurrence: ItemCooccurrence | None = None):
    self.k, self.shrink, self.cooccurrence = k, shrink, cooccurrence

  def _fit(self, data):
    if self.cooccurrence is None:
      self.cooccurrence = ItemCooccurrence.from_data(data)
    elif (self.cooccurrence.counts.shape[0] != data.num_items or
          self.cooccurrence.num_train != int(data.mask(("train",)).sum())):
      raise ValueError("ItemKNN: the given co-occurrence was computed from other data")
    self.similarity = self.cooccurrence.similarity(self.k, self.shrink)

  def score_catalog(self, queries, domain):
    sim = self.similarity[:, self._columns(domain)]
    return np.asarray((queries.context.astype(np.float32) @ sim).todense(), np.float32)


# ------------------------------------------------------------------------------------ EASE

# EASE's dense [n, n] float32 weights: 20,000 items is 1.6 GB, and its cost grows as n^2 (memory)
# and n^3 (the inverse). Past this many items a domain is fitted on its most popular ones.
EASE_MAX_ITEMS = 20_000


def available_memory() -> int:
  """Bytes this process can still allocate: MemAvailable (Linux), else physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def ease_bytes(n: int, gram_nnz: int) -> int:
  """Peak bytes of ``ease_weights`` on n items: the sparse Gram (value + index + its CSR copy)
  and the dense float32 matrix LAPACK works on in place."""
  return 24 * gram_nnz + 4 * n * n


def ease_weights(X: sp.spmatrix, lam: float, max_items: int = EASE_MAX_ITEMS, name: str = ""
                 ) -> tuple[np.ndarray, np.ndarray]:
  """EASE (Steck 2019) on the columns with interactions: B = I - P / diag(P),
  P = (X'X + lam I)^-1, so diag(B) = 0. Float32 Cholesky, in place (B is [n, n]: the memory).
  Past ``max_items`` columns with interactions, only the ``max_items`` most popular are kept
  (a one-line notice says so). The dense matrix is sized against the free memory before LAPACK
  is called. Returns (active columns, B)."""
  counts = np.asarray(X.sum(0)).ravel()
  active = np.flatnonzero(counts > 0)
  where = f" in domain {name}" if name else ""
  if max_items and len(active) > max_items:
    keep = np.sort(active[np.argsort(-counts[active], kind="stable")[:max_items]])
    print(f"EASE{where}: {len(active):,} items have train interactions; fitting on the "
          f"{max_items:,} most popular (fusion.ease_max_items); the other "
          f"{len(active) - max_items:,} get EASE's lowest score and are ranked by the other "
          "components.", flush=True)
    active = keep
  Xa = sp.csc_matrix(X, dtype=np.float32)[:, active]
  n = len(active)
  # An upper bound of the Gram's entries, from the users' row counts: sum over users of c_u^2.
  per_user = np.diff(sp.csr_matrix(Xa).indptr).astype(np.int64)
  need, free = ease_bytes(n, min(int(np.sum(per_user ** 2)), n * n)), available_memory()
  if need > free:
    raise errors.OutOfMemoryError(
        f"EASE{where} on {n:,} items needs about {need / 2**30:.1f} GiB and {free / 2**30:.1f} "
        "GiB is free: lower fusion.ease_max_items (or drop \"ease\" from fusion.components).")
  gram = (Xa.T @ Xa).toarray()
  gram[np.diag_indices_from(gram)] += lam
  # gram is symmetric: its transpose is the Fortran-ordered array LAPACK can overwrite.
  c, info = scipy.linalg.lapack.spotrf(gram.T, lower=1, overwrite_a=1)
  if info:
    raise np.linalg.LinAlgError(f"EASE: Cholesky failed ({info})")
  p, info = scipy.linalg.lapack.spotri(c, lower=1, overwrite_c=1)
  if info:
    raise np.linalg.LinAlgError(f"EASE: inverse failed ({info})")
  _symmetrise_from_lower(p)
  B = p.T  # symmetric: the C-ordered view
  B /= -np.diag(B).copy()[None, :]
  B[np.diag_indices_from(B)] = 0.0
  return active, B


def _symmetrise_from_lower(a: np.ndarray, block: int = 2048) -> None:
  """Copies the lower triangle onto the upper one in blocks (no [n, n] temporaries)."""
  for s in range(0, a.shape[0], block):
    e = min(s + block, a.shape[0])
    a[s:e, e:] = a[e:, s:e].T
    diag = a[s:e, s:e]
    diag[...] = np.tril(diag) + np.tril(diag, -1).T


class EASE(Recommender):
  """EASE per domain on the items with train interactions (the others score lowest), at most
  ``max_items`` of them per domain (the most popular; 0: no bound); a user is their context in
  the domain, so users unknown to training are scored the same way."""
  name = "EASE (per domain)"

  def __init__(self, lam: float = 30.0, domains: Sequence[int] | None = None,
               max_items: int = EASE_MAX_ITEMS):
    self.lam, self.fit_domains, self.max_items = lam, domains, max_items

  def _fit(self, data):
    X = data.matrix(("train",))
    self.weights = {}
    for d in (range(len(data.domains)) if self.fit_domains is None else self.fit_domains):
      self.weights[d] = ease_weights(X[:, self._columns(d)], self.lam, self.max_items,
                                     data.domains[d]["name"])

  def score_catalog(self, queries, domain):
    if domain not in self.weights:
      raise ValueError(f"EASE was fitted on domains {sorted(self.weights)}, not {domain}")
    active, B = self.weights[domain]
    history = queries.context[:, self._columns(domain)][:, active].astype(np.float32)
    scores = np.full((len(queries), self.offsets[domain + 1] - self.offsets[domain]),
                     LOWEST_SCORE, np.float32)
    scores[:, active] = np.asarray(history @ B)
    return scores


# ------------------------------------------------------------------------------------- BPR

class BPR(Recommender):
  """ID-only matrix factorisation (user and item vectors, item bias), BPR loss with one uniform
  negative from the positive's domain. Users without train interactions have no vector: they
  get the item biases alone (the model cannot use context)."""
  name = "ID-only MF (BPR)"

  def __init__(self, dim: int = 64, epochs: int = 20, lr: float = 0.01, l2: float = 1e-4,
               seed: int = 0, batch_size: int = 4096):
    self.dim, self.epochs, self.lr, self.l2, self.seed = dim, epochs, lr, l2, seed
    self.batch_size = batch_size

  def _fit(self, data):
    coo = data.matrix(("train",)).tocoo()
    users, items = coo.row.astype(np.int32), coo.col.astype(np.int32)
    domain = data.domain_of_item()[items]
    lo, size = jnp.asarray(self.offsets[:-1]), jnp.asarray(np.diff(self.offsets))
    k_user, k_item, key = jax.random.split(jax.random.PRNGKey(self.seed), 3)
    params = {"user": 0.01 * jax.random.normal(k_user, (data.num_users, self.dim)),
              "item": 0.01 * jax.random.normal(k_item, (data.num_items, self.dim)),
              "bias": jnp.zeros(data.num_items)}
    tx = optax.adam(self.lr)
    l2 = self.l2

    @jax.jit
    def step(params, opt_state, u, i, d, key):
      j = lo[d] + jax.random.randint(key, i.shape, 0, size[d])

      def loss(p):
        pu, qi, qj = p["user"][u], p["item"][i], p["item"][j]
        diff = jnp.sum(pu * (qi - qj), -1) + p["bias"][i] - p["bias"][j]
        reg = l2 * (jnp.sum(pu ** 2) + jnp.sum(qi ** 2) + jnp.sum(qj ** 2)) / len(u)
        return -jnp.mean(jax.nn.log_sigmoid(diff)) + reg
      grads = jax.grad(loss)(params)
      updates, opt_state = tx.update(grads, opt_state)
      return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    rng = np.random.default_rng(self.seed)
    batch = min(self.batch_size, len(users))
    for _ in range(self.epochs):
      perm = rng.permutation(len(users))
      for start in range(0, len(perm) - batch + 1, batch):
        b = perm[start:start + batch]
        key, sub = jax.random.split(key)
        params, opt_state = step(params, opt_state, users[b], items[b], domain[b], sub)
    self.params = jax.tree.map(np.asarray, params)

  def score_catalog(self, queries, domain):
    cols = self._columns(domain)
    known = queries.user >= 0
    user_vec = np.where(known[:, None], self.params["user"][np.maximum(queries.user, 0)], 0.0)
    return (user_vec @ self.params["item"][cols].T + self.params["bias"][cols]).astype(np.float32)
