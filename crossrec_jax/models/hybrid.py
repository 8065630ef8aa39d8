"""The hybrid model: collaborative components on top of cached (frozen-encoder) text vectors.

score(u, i, d) = mu_d + b_{u,d} + b_i + <user_d(u), item(i)>

item(i)   = q_i (ID factors) + W_item · text_i (frozen encoder vector of the item text)
          + mean of the item's tag embeddings (side features such as genres)
user_d(u) = p_u (ID factors; zero for a user unknown to training)
          + g_d · |N_d|^-1/2 Σ_{j∈N_d} y_j + g'_d · |N_o|^-1/2 Σ_{j∈N_o} y_j,
            y_j = y_j (ID) + W_history · text_j
          + MLP_d([mean text of N_d, mean text of N_o])
          + W_profile · profile_u                                        (optional)
          + mean of the user's tag embeddings (side features such as demographics)

N_d is the user's history in the target domain and N_o in the other domains: they are kept as
separate signals with per-domain gates, because mixing them into one pooled vector measurably
hurt on Amazon Arts x Office. The history terms are how a cold user (no ID row) is represented.
Each component is a config switch, so the benchmark can ablate it.

Every parameter carries ``logical_axes``: the user- and item-indexed tables (ID factors, biases,
history factors) have rows ``users`` / ``items``, which ``sharding.py`` splits over the devices.
Their row counts are padded to ``ROW_MULTIPLE`` (zero rows that no index reaches) so that they
divide over any data-parallel mesh, and that padding does not depend on the device count: a
checkpoint restores on another mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

ROW_MULTIPLE = 512
USERS, ITEMS = "users", "items"   # logical axes of the ID tables' rows (sharding.DEFAULT_RULES)


def padded_rows(n: int) -> int:
  """Rows of a table over ``n`` ids plus the unknown / padding row."""
  return -(-(n + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  num_users: int
  num_items: int
  num_domains: int
  text_dim: int = 0                 # 0: no text vectors
  num_tags: int = 0                 # categorical item side features (0: none)
  num_user_tags: int = 0            # categorical user side features, e.g. demographics
  dim: int = 64
  use_biases: bool = True
  use_ids: bool = True              # q_i (and p_u when use_user_ids)
  use_user_ids: bool = True         # p_u: off when evaluation users are unknown to training
  use_history: bool = True          # implicit-feedback term over the history (y_j)
  use_text: bool = True             # item text projection
  use_history_text: bool = True     # MLP over the mean text vectors of the histories
  history_text_projection: bool = True  # y_j += W_history · text_j (text-aware history factors)
  use_profile: bool = False         # projection of the profile text vector
  cross_domain: bool = True         # other domains' history as a separate gated signal
  mlp_hidden: int = 256

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _normal(rngs, shape, std):
  return jax.random.normal(rngs.params(), shape) * std


def _param(value, axes, rows=None):
  """A parameter with its logical axes; ``rows``: zero-pad the first axis to that many rows
  (drawn at the unpadded shape, so the values do not depend on the padding)."""
  if rows is not None:
    value = jnp.pad(value, [(0, rows - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
  return nnx.Param(value, logical_axes=axes)


def _linear(rngs, n_in, n_out, **kw):
  return nnx.Linear(n_in, n_out, rngs=rngs, kernel_metadata={"logical_axes": (None, None)},
                    bias_metadata={"logical_axes": (None,)}, **kw)


class HybridRecommender(nnx.Module):
  """Inputs are indices into the cached tables; see ``training.hybrid`` for the batches."""

  def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    users, items = padded_rows(c.num_users), padded_rows(c.num_items)
    self.global_bias = _param(jnp.zeros((c.num_domains,)), (None,))
    self.user_bias = _param(jnp.zeros((c.num_users + 1, c.num_domains)), (USERS, None), users)
    self.item_bias = _param(jnp.zeros((c.num_items + 1,)), (ITEMS,), items)
    # Row num_users / num_items is the "unknown" / padding row: kept at zero by masking.
    self.user_factors = _param(_normal(rngs, (c.num_users + 1, c.dim), 0.01), (USERS, None), users)
    self.item_factors = _param(_normal(rngs, (c.num_items + 1, c.dim), 0.01), (ITEMS, None), items)
    self.tag_embeddings = _param(_normal(rngs, (max(c.num_tags, 1), c.dim), 0.01), (None, None))
    self.user_tag_embeddings = _param(_normal(rngs, (max(c.num_user_tags, 1), c.dim), 0.01),
                                      (None, None))
    self.history_factors = _param(_normal(rngs, (c.num_items + 1, c.dim), 0.01), (ITEMS, None), items)
    self.history_gates = _param(jnp.stack([jnp.ones(c.num_domains),
                                           jnp.full(c.num_domains, 0.5)], -1), (None, None))
    if c.text_dim:
      small = nnx.initializers.normal(0.01)
      self.item_text = _linear(rngs, c.text_dim, c.dim, use_bias=False, kernel_init=small)
      self.history_mlp_in = _linear(rngs, 2 * c.text_dim + 2 + c.num_domains, c.mlp_hidden)
      self.history_mlp_out = _linear(rngs, c.mlp_hidden, c.dim, kernel_init=small)
      self.history_text = _linear(rngs, c.text_dim, c.dim, use_bias=False, kernel_init=small)
      self.profile_text = _linear(rngs, c.text_dim, c.dim, use_bias=False, kernel_init=small)

  # --------------------------------------------------------------------------------- towers
  def item_vectors(self, text, items=None, item_delta=None, tags=None):
    """[n, dim] item vectors (all items when ``items`` is None) and their biases."""
    c = self.config
    q = self.item_factors.value if items is None else self.item_factors.value[items]
    vec = q if c.use_ids else jnp.zeros_like(q)
    # Side vectors are projected for the rows asked for, or for the whole catalog and then
    # gathered when a batch names more items than the catalog has (a full-batch step).
    def side(table, project):
      if items is None:
        return project(table)
      if items.shape[0] > table.shape[0]:
        return project(table)[items]
      return project(table[items])

    if c.use_text and c.text_dim:
      vec = vec + side(text, self.item_text)
    if c.num_tags and tags is not None:   # tags: [num_items + 1, num_tags], rows sum to 1
      vec = vec + side(tags, lambda t: t @ self.tag_embeddings.value)
    if item_delta is not None:
      vec = vec + item_delta
    bias = self.item_bias.value if items is None else self.item_bias.value[items]
    return vec, (bias if c.use_biases else jnp.zeros_like(bias))

  def example_user_vectors(self, batch, text, domain_of_item, profile=None, user_delta=None,
                           user_tags=None):
    """[B, dim] user vector of each example for its target domain.

    Histories are pooled once per distinct history row (``batch["hist"]``, [H, L]) and gathered
    per example (``example_hist``). The pooling reads the history entries as a flat list
    (``hist_items`` with their row ``hist_rows``; padding items are ``num_items``) when the batch
    has one: histories of very different lengths padded to [H, L] cost L / mean length times
    more (9x on MovieLens). Where a train example's own target is part of its history
    (``self_in_history``, SVD++-style histories of random splits) it is taken out again, so
    training sees what evaluation sees: a history without the target.
    """
    c = self.config
    sums, n_same, n_other, dom = (self._window_sums(batch, domain_of_item) if "seq_items" in batch
                                  else self._row_sums(batch, domain_of_item))
    vec = jnp.zeros((dom.shape[0], c.dim))
    if c.use_history:
      y = self.history_factors.value
      if c.history_text_projection and c.text_dim and c.use_text:
        y = y + self.history_text(text)   # also gives rarely seen history items a factor
      y_same, y_other = sums(y)
      gates = self.history_gates.value[dom]                        # [B, 2]
      vec = vec + gates[:, :1] * y_same * jax.lax.rsqrt(jnp.maximum(n_same, 1.0))
      vec = vec + gates[:, 1:] * y_other * jax.lax.rsqrt(jnp.maximum(n_other, 1.0))
    if c.use_history_text and c.text_dim:
      t_same, t_other = sums(text)
      t_same, t_other = t_same / jnp.maximum(n_same, 1.0), t_other / jnp.maximum(n_other, 1.0)
      features = jnp.concatenate([
          t_same, t_other, (n_same > 0).astype(jnp.float32), (n_other > 0).astype(jnp.float32),
          jax.nn.one_hot(dom, c.num_domains)], -1)
      vec = vec + self.history_mlp_out(jax.nn.gelu(self.history_mlp_in(features)))
    if c.use_profile and c.text_dim and profile is not None:
      rows = batch["hist_profile"]
      vec = vec + (self.profile_text(profile[rows]) if "seq_items" in batch
                   else self.profile_text(profile[rows])[batch["example_hist"]])
    user = batch["user"]                                           # num_users when unknown
    if c.use_ids and c.use_user_ids:
      vec = vec + self.user_factors.value[user] * (user < c.num_users)[:, None]
    if c.num_user_tags and user_tags is not None:  # [num_users + 1, num_user_tags]; last row 0
      if user.shape[0] > user_tags.shape[0]:   # project each user once, then gather
        vec = vec + (user_tags @ self.user_tag_embeddings.value)[user]
      else:
        vec = vec + user_tags[user] @ self.user_tag_embeddings.value
    if user_delta is not None:
      vec = vec + user_delta
    return vec

  def _row_sums(self, batch, domain_of_item):
    """History sums pooled once per distinct history row (``hist_items`` / ``hist_rows``, or
    ``hist`` [H, L]) and gathered per example (``example_hist``): (sums(table) -> (same,
    other) [B, F], n_same [B, 1], n_other [B, 1], the examples' domains [B])."""
    c = self.config
    dom = batch["hist_domain"]                                     # [H]
    num_rows = dom.shape[0]
    if "hist_items" in batch:
      items, rows = batch["hist_items"], batch["hist_rows"]
    else:
      items = batch["hist"].reshape(-1)
      rows = jnp.repeat(jnp.arange(num_rows), batch["hist"].shape[1])
    at = batch["example_hist"]
    own = batch["self_in_history"].astype(jnp.float32)[:, None]   # [B, 1]
    own_item = batch["item"]
    valid = items < c.num_items
    same = valid & (domain_of_item[items] == dom[rows])
    other = valid & ~same if c.cross_domain else jnp.zeros_like(valid)
    count = lambda mask: jax.ops.segment_sum(mask.astype(jnp.float32), rows, num_rows)

    def pooled(table, mask):                                       # per history row: sum
      return jax.ops.segment_sum(mask.astype(table.dtype)[:, None] * table[items], rows, num_rows)

    def sums(table):
      return pooled(table, same)[at] - own * table[own_item], pooled(table, other)[at]

    return sums, count(same)[at][:, None] - own, count(other)[at][:, None], dom[at]

  def _window_sums(self, batch, domain_of_item):
    """The same sums for prefix histories (each example sees the newest rows of its user's
    sequence before it), read off per-domain prefix sums of each user's sequence, so the cost
    is the sequences' length, not examples x history length. ``seq_items`` [M]: the batch's
    users' sequences back to back, each closed by a padding entry; ``seq_start`` [M]: 1 where
    a sequence starts; ``window_lo`` / ``window_hi`` [B]: each example's history is
    ``seq_items[lo:hi]`` (hi at most its sequence's closing entry)."""
    c = self.config
    items, lo, hi, dom = batch["seq_items"], batch["window_lo"], batch["window_hi"], batch["domain"]
    valid = items < c.num_items
    item_domain = jnp.where(valid, domain_of_item[items], -1)
    onehot = (item_domain[:, None] == jnp.arange(c.num_domains)[None, :]).astype(jnp.float32)
    start = batch["seq_start"].astype(bool)

    def before(x):
      """Per entry: the sum of x over the earlier entries of its sequence ([M, ...])."""
      flag = start.reshape(start.shape + (1,) * (x.ndim - 1))

      def add(a, b):
        return jnp.where(b[1], b[0], a[0] + b[0]), a[1] | b[1]

      inclusive, _ = jax.lax.associative_scan(add, (x, jnp.broadcast_to(flag, x.shape)))
      return inclusive - x

    def window(x):                                                 # [B, D, ...]
      e = before(x)
      return e[hi] - e[lo]

    rows = jnp.arange(dom.shape[0])
    counts = window(onehot)                                        # [B, D]
    n_same = counts[rows, dom][:, None]
    n_other = (counts.sum(1)[:, None] - n_same) if c.cross_domain else jnp.zeros_like(n_same)

    def sums(table):
      w = window(onehot[:, :, None] * table[items][:, None, :])    # [B, D, F]
      same = w[rows, dom]
      other = (w.sum(1) - same) if c.cross_domain else jnp.zeros_like(same)
      return same, other

    return sums, n_same, n_other, dom

  def user_bias_of(self, user, domain):
    """mu_d + b_{u,d}; the global mean stays when biases are switched off."""
    mu = self.global_bias.value[domain]
    if not self.config.use_biases:
      return mu
    known = (user < self.config.num_users).astype(jnp.float32)
    return mu + self.user_bias.value[user, domain] * known
