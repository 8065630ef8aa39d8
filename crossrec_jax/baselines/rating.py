"""Rating baselines, one model per explicit ("rating") domain: item mean, user + item biases,
biased matrix factorisation (ALS-WR) and I-AutoRec. Predictions are clipped to the domain's
rating range; a user unknown to training gets the item-only terms."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse as sp

from crossrec_jax.baselines.base import Recommender


@dataclasses.dataclass
class RatingTerms:
  """r(u, i) = mean + user_bias[u] + item_bias[i] + user_vec[u] . item_vec[i] in one domain.

  The user arrays carry one extra zero row, so user -1 (unknown to training) reads it and gets
  the item-only terms without a branch."""
  mean: float
  user_bias: np.ndarray                 # [num_users + 1]
  item_bias: np.ndarray                 # [N_d]
  user_vec: np.ndarray | None = None    # [num_users + 1, rank]
  item_vec: np.ndarray | None = None    # [N_d, rank]

  def pairs(self, user: np.ndarray, col: np.ndarray) -> np.ndarray:
    out = self.mean + self.user_bias[user] + self.item_bias[col]
    if self.user_vec is not None:
      out = out + np.einsum("nr,nr->n", self.user_vec[user], self.item_vec[col])
    return out

  def grid(self, user: np.ndarray) -> np.ndarray:
    out = self.mean + self.user_bias[user][:, None] + self.item_bias[None, :]
    if self.user_vec is not None:
      out = out + self.user_vec[user] @ self.item_vec.T
    return out


class RatingRecommender(Recommender):
  """Fits ``_fit_domain`` on each rating domain's train ratings; scores are clipped ratings."""

  def _fit(self, data):
    self.per_domain = {}
    for d, spec in enumerate(data.domains):
      if spec["task"] == "rating":
        sel = data.mask(("train",), d)
        self.per_domain[d] = self._fit_domain(
            data.user[sel], data.item[sel] - self.offsets[d], data.label[sel], data.num_users,
            int(self.offsets[d + 1] - self.offsets[d]))

  def _fit_domain(self, user, col, rating, num_users, num_items):
    """Returns an object with ``pairs(user, col)`` and ``grid(user)``, like RatingTerms."""
    raise NotImplementedError

  def _domain_model(self, d: int):
    if d not in self.per_domain:
      spec = self.domains[d]
      raise ValueError(f"{self.name} models rating domains; {spec['name']!r} is {spec['task']}")
    return self.per_domain[d]

  def _clip(self, d, x):
    return np.clip(x, self.domains[d]["min_rating"], self.domains[d]["max_rating"]).astype(
        np.float32)

  def score_pairs(self, queries):
    out = np.empty(len(queries), np.float32)
    for d in np.unique(queries.domain):
      idx = np.flatnonzero(queries.domain == d)
      pred = self._domain_model(d).pairs(queries.user[idx], queries.item[idx] - self.offsets[d])
      out[idx] = self._clip(d, pred)
    return out

  def score_catalog(self, queries, domain):
    return self._clip(domain, self._domain_model(domain).grid(queries.user))


def fit_biases(user, col, rating, num_users, num_items, reg, sweeps=15) -> RatingTerms:
  """r ~ mean + b_u + b_i with L2 ``reg`` on both, by alternating exact ridge solutions."""
  mean = float(rating.mean()) if len(rating) else 0.0
  n_user = np.bincount(user, minlength=num_users + 1)
  n_item = np.bincount(col, minlength=num_items)
  b_user, b_item = np.zeros(num_users + 1), np.zeros(num_items)
  for _ in range(sweeps):
    b_user = np.bincount(user, rating - mean - b_item[col], num_users + 1) / np.maximum(
        reg + n_user, 1e-12)
    b_item = np.bincount(col, rating - mean - b_user[user], num_items) / np.maximum(
        reg + n_item, 1e-12)
  return RatingTerms(mean, b_user, b_item)


ITEM_MEAN_SHRINK = 5.0  # pseudo-ratings at the domain mean: the item-mean baseline of every mode


def shrunk_item_means(total: np.ndarray, count: np.ndarray, prior, shrink: float = ITEM_MEAN_SHRINK
                      ) -> np.ndarray:
  """Per item (total + shrink * prior) / (count + shrink); an item without ratings gets
  ``prior`` (its domain's mean rating; a scalar or one per item)."""
  means = (total + shrink * prior) / np.maximum(count + shrink, 1e-12)
  return np.where(count > 0, means, prior)


class ItemMean(RatingRecommender):
  """Each item's mean train rating, shrunk towards the domain mean by ``shrink`` pseudo-ratings
  (an item rated once is not trusted as much as one rated a hundred times)."""
  name = "item mean"

  def __init__(self, shrink: float = ITEM_MEAN_SHRINK):
    self.shrink = shrink

  def _fit_domain(self, user, col, rating, num_users, num_items):
    mean = float(rating.mean()) if len(rating) else 0.0
    item_mean = shrunk_item_means(np.bincount(col, rating, num_items),
                                  np.bincount(col, minlength=num_items), mean, self.shrink)
    return RatingTerms(mean, np.zeros(num_users + 1), item_mean - mean)


class UserItemBias(RatingRecommender):
  """mean + user bias + item bias (alternating ridge): the classical rating baseline."""
  name = "user+item bias"

  def __init__(self, reg: float = 5.0, sweeps: int = 15):
    self.reg, self.sweeps = reg, sweeps

  def _fit_domain(self, user, col, rating, num_users, num_items):
    return fit_biases(user, col, rating, num_users, num_items, self.reg, self.sweeps)


def _ridge_per_row(pattern, rows, cols, target, other, reg, bias_reg):
  """For every row entity e at once: argmin over [p_e, b_e] of
  sum_(e,o) (target - p_e.q_o - b_e)^2 + reg n_e |p_e|^2 + bias_reg b_e^2, where other = [q, b].

  The normal equations of all entities are two sparse @ dense products (the Gram of each entity
  sums the outer products of the features it rated), then one batched solve."""
  num_rows, rank = pattern.shape[0], other.shape[1] - 1
  x = np.hstack([other[:, :rank], np.ones((len(other), 1))])
  outer = (x[:, :, None] * x[:, None, :]).reshape(len(x), -1)
  gram = np.asarray(pattern @ outer).reshape(num_rows, rank + 1, rank + 1)
  rhs = sp.csr_matrix((target, (rows, cols)), shape=pattern.shape) @ x
  count = np.asarray(pattern.sum(1)).ravel()
  empty = (count == 0).astype(float)  # no ratings: solve to zero instead of a singular system
  penalty = np.concatenate([np.repeat((reg * count + empty)[:, None], rank, 1),
                            (bias_reg + empty)[:, None]], 1)
  diag = np.arange(rank + 1)
  gram[:, diag, diag] += penalty
  return np.linalg.solve(gram, rhs[..., None])[..., 0]


class BiasedMF(RatingRecommender):
  """r ~ mean + b_u + b_i + p_u.q_i by alternating least squares, L2 on the factors weighted by
  each entity's rating count (ALS-WR, Zhou et al. 2008) and a plain L2 on the biases."""
  name = "biased MF (ALS)"

  def __init__(self, rank: int = 50, reg: float = 0.15, bias_reg: float = 1.0, sweeps: int = 15,
               seed: int = 0):
    self.rank, self.reg, self.bias_reg, self.sweeps, self.seed = rank, reg, bias_reg, sweeps, seed

  def _fit_domain(self, user, col, rating, num_users, num_items):
    mean = float(rating.mean()) if len(rating) else 0.0
    rng = np.random.default_rng(self.seed)
    # [p, b] per user (one extra zero row: the unknown user) and [q, b] per item.
    P = np.zeros((num_users + 1, self.rank + 1))
    Q = np.hstack([rng.normal(0, 0.1, (num_items, self.rank)), np.zeros((num_items, 1))])
    by_user = sp.csr_matrix((np.ones(len(user)), (user, col)), shape=(num_users + 1, num_items))
    by_item = by_user.T.tocsr()
    for _ in range(self.sweeps):
      P = _ridge_per_row(by_user, user, col, rating - mean - Q[col, -1], Q, self.reg,
                         self.bias_reg)
      Q = _ridge_per_row(by_item, col, user, rating - mean - P[user, -1], P, self.reg,
                         self.bias_reg)
    return RatingTerms(mean, P[:, -1], Q[:, -1], P[:, :-1], Q[:, :-1])


# ---------------------------------------------------------------------------------- AutoRec

@dataclasses.dataclass
class _AutoRecTerms:
  """Reconstructed ratings of a domain; pairs the network never saw (no train rating of the
  user or of the item there) come from the user + item biases instead."""
  hidden: np.ndarray        # [N_d, H]: the encoding of each item's train ratings
  decoder: np.ndarray       # [H, num_users]
  decoder_bias: np.ndarray  # [num_users]
  fallback: RatingTerms
  user_seen: np.ndarray     # [num_users + 1] bool, False for the unknown user (-1)
  item_seen: np.ndarray     # [N_d] bool

  def pairs(self, user, col):
    u = np.maximum(user, 0)
    recon = np.einsum("nh,hn->n", self.hidden[col], self.decoder[:, u]) + self.decoder_bias[u]
    seen = self.user_seen[user] & self.item_seen[col]
    return np.where(seen, recon, self.fallback.pairs(user, col))

  def grid(self, user):
    u = np.maximum(user, 0)
    recon = (self.hidden @ self.decoder[:, u]).T + self.decoder_bias[u][:, None]
    seen = self.user_seen[user][:, None] & self.item_seen[None, :]
    return np.where(seen, recon, self.fallback.grid(user))


class AutoRec(RatingRecommender):
  """I-AutoRec (Sedhain et al. 2015): each item is the vector of its users' train ratings,
  encoded by sigmoid(r V + mu) and decoded by h W + b; the squared error counts observed ratings
  only, plus (l2 / 2)(|V|^2 + |W|^2). Full-batch Adam with a cosine decay (a domain's rating
  matrix is dense in memory).

  Dropout on the input ratings (denoising: the loss still counts the dropped ones, which is the
  test-time task of predicting a rating that is not in the input) and on the hidden units: with
  500 units and L2 alone the model overfits ML-100K (test RMSE 0.904 at the best L2, 0.890 with
  both dropouts). input_dropout=hidden_dropout=0 is the paper's model."""
  name = "I-AutoRec"

  def __init__(self, hidden: int = 500, l2: float = 100.0, steps: int = 300, lr: float = 5e-3,
               input_dropout: float = 0.5, hidden_dropout: float = 0.5, seed: int = 0,
               bias_reg: float = 5.0):
    self.hidden, self.l2, self.steps, self.lr, self.seed = hidden, l2, steps, lr, seed
    self.input_dropout, self.hidden_dropout, self.bias_reg = input_dropout, hidden_dropout, bias_reg

  def _fit_domain(self, user, col, rating, num_users, num_items):
    fallback = fit_biases(user, col, rating, num_users, num_items, self.bias_reg)
    ratings = np.zeros((num_items, num_users), np.float32)
    ratings[col, user] = rating
    observed = np.zeros((num_items, num_users), np.float32)
    observed[col, user] = 1.0
    k_enc, k_dec, k_drop = jax.random.split(jax.random.PRNGKey(self.seed), 3)
    init = jax.nn.initializers.glorot_uniform()
    params = {"enc": init(k_enc, (num_users, self.hidden)), "enc_bias": jnp.zeros(self.hidden),
              "dec": init(k_dec, (self.hidden, num_users)),
              "dec_bias": jnp.full(num_users, fallback.mean, jnp.float32)}
    tx = optax.adam(optax.cosine_decay_schedule(self.lr, max(self.steps, 1)))
    l2, p_in, p_hidden = self.l2, self.input_dropout, self.hidden_dropout

    def dropout(key, x, rate):
      return x if rate == 0 else x * jax.random.bernoulli(key, 1 - rate, x.shape) / (1 - rate)

    def loss(p, r, m, key):
      k_in, k_hidden = jax.random.split(key)
      h = jax.nn.sigmoid(dropout(k_in, r, p_in) @ p["enc"] + p["enc_bias"])
      err = m * (dropout(k_hidden, h, p_hidden) @ p["dec"] + p["dec_bias"] - r)
      return jnp.sum(err ** 2) + 0.5 * l2 * (jnp.sum(p["enc"] ** 2) + jnp.sum(p["dec"] ** 2))

    @jax.jit
    def train(params, r, m):
      def step(carry, n):
        params, opt_state = carry
        grads = jax.grad(loss)(params, r, m, jax.random.fold_in(k_drop, n))
        updates, opt_state = tx.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None
      (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(self.steps))
      return params, jax.nn.sigmoid(r @ params["enc"] + params["enc_bias"])

    params, hidden = jax.device_get(train(params, jnp.asarray(ratings), jnp.asarray(observed)))
    return _AutoRecTerms(
        np.asarray(hidden), np.asarray(params["dec"]), np.asarray(params["dec_bias"]), fallback,
        np.bincount(user, minlength=num_users + 1) > 0, np.bincount(col, minlength=num_items) > 0)
