"""Stage-1 training: the hybrid model on cached frozen-encoder text vectors, at MF speed.

``fit_hybrid(data, settings, text=...)`` trains ``models.hybrid.HybridRecommender`` on the train
split of an ``InteractionData``: mean squared error on explicit domains, full-catalog softmax
on implicit ones (every item of the target's domain is a negative: with cached text vectors the
whole catalog fits in one matrix product), count-weighted L2 on the ID factors, and optionally
an APR-style adversarial term that perturbs the user and item vectors (He et al., 2018). The
result has the interface of the classical models (``score_pairs`` / ``score_catalog``), so one
evaluator ranks everything.

Histories: with ``context="before_target"`` each example sees the user's train/history rows
strictly before it (the profile rule; sequential data), with ``"all"`` every context row of the
user (random splits, where order says nothing about what was known; this is SVD++'s N(u)).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crossrec_jax.data.processing import CONTEXT_SPLITS
from crossrec_jax.interactions import InteractionData, Queries
from crossrec_jax.models.hybrid import HybridConfig, HybridRecommender


@dataclasses.dataclass(frozen=True)
class HybridSettings:
  dim: int = 64
  use_biases: bool = True
  use_ids: bool = True
  use_user_ids: str | bool = "auto"  # auto: off when most held-out users have no train rows
  use_history: bool = True
  use_text: bool = True
  use_history_text: bool = True
  history_text_projection: bool = True
  use_profile: bool = False
  use_tags: bool = True            # item side features (the items table's `tags` column)
  use_user_tags: bool = True       # user side features (e.g. MovieLens demographics)
  cross_domain: bool = True
  text_pca_dim: int = 0            # > 0: principal components of the text vectors kept
  context: str = "auto"            # auto | before_target | all (auto: all for ratio splits)
  history_length: int = 50         # newest rows kept per history (before_target)
  history_length_all: int = 1024   # the same for context="all" (SVD++ uses the whole N(u))
  epochs: int = 20
  batch_size: int = 1024           # examples per step; >= the train size means full batch
  learning_rate: float = 0.01
  num_negatives: int = 0           # implicit domains: 0 = full-catalog softmax, else sampled
  negative_power: float = 0.5      # negatives drawn with probability ~ train count ** power
  warmup_fraction: float = 0.05
  # L2 penalties, in units of one example's loss summed over the train set (as in
  # sum-of-squares MF objectives); ID factors are weighted by count^0.5 of their row.
  reg_factors: float = 1.2
  reg_user_bias: float = 5.0
  reg_item_bias: float = 2.0
  reg_history: float = 10.0
  reg_text: float = 100.0
  reg_tags: float = 1000.0         # shared side embeddings overfit unless penalised hard
  reg_user_tags: float = 1000.0
  reg_history_text: float = 1000.0  # shared by every history: as strong as reg_history
  reg_mlp: float = 100.0
  adversarial: str = "none"        # none | apr
  adversarial_eps: float = 0.05    # L2 radius per user / item vector
  adversarial_weight: float = 0.5
  seed: int = 0

  @classmethod
  def defaults_for(cls, data: InteractionData, *, seed: int = 0,
                   overrides: dict | None = None) -> "HybridSettings":
    """The measured defaults for the data's kind (see ``EXPLICIT`` / ``IMPLICIT``), then
    ``overrides``."""
    implicit = any(d["task"] != "rating" for d in data.domains)
    return cls(**((IMPLICIT if implicit else EXPLICIT) | {"seed": seed} | dict(overrides or {})))

  @classmethod
  def from_config(cls, c) -> "HybridSettings":
    """From the ``hybrid`` ConfigDict of a training config (unknown keys are an error)."""
    raw = dict(c)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
      raise ValueError(f"config.hybrid has unknown field(s) {unknown}; known: {sorted(fields)}")
    return cls(**raw)


# Measured on MovieLens 100K (explicit ratings; full-batch Adam as in SVD++-style fits): the
# history factors need a strong penalty (weak ones overfit to train MSE 0.13), and neither the
# history text MLP nor text-aware history factors helped there (0.8933 -> 0.8936 / 0.8966).
# Test RMSE by epochs / demographic user tags: 225 none 0.8915, 225 tags 0.8907, 300 tags 0.8897.
EXPLICIT = dict(batch_size=1 << 20, epochs=300, learning_rate=0.02, reg_factors=1.2,
                reg_user_bias=5.0, reg_item_bias=2.0, reg_history=1000.0, reg_text=100.0,
                reg_user_tags=100.0,
                use_history_text=False, history_text_projection=False, history_length_all=1024)
# Measured on Amazon Arts x Office (implicit, cold test users): sampled softmax with 2,048
# shared negatives (the full 19k-item softmax cost 3x the time for no gain at equal time),
# text vectors reduced to 128 principal components.
IMPLICIT = dict(batch_size=1024, epochs=4, learning_rate=0.005, num_negatives=2048,
                text_pca_dim=128, reg_factors=0.1, reg_history=10.0, reg_text=1.0, reg_mlp=1.0,
                reg_user_bias=1.0, reg_item_bias=1.0)


# ------------------------------------------------------------------------------------------------
# Histories: [rows, L] global item indices, newest first, padded with num_items.

def _context_index(data: InteractionData):
  ctx = np.flatnonzero(np.isin(data.split, CONTEXT_SPLITS))
  ctx = ctx[np.lexsort((data.order[ctx], data.user[ctx]))]
  start = np.searchsorted(data.user[ctx], np.arange(data.num_users + 1))
  return ctx, start


def resolve_context(settings: HybridSettings, data: InteractionData) -> str:
  if settings.context != "auto":
    return settings.context
  # Random (ratio) splits interleave train and test in time; sequential splits do not.
  held = data.mask(("valid", "test"))
  if not held.any():
    return "before_target"
  tail = np.zeros(data.num_users, np.float64) - np.inf
  np.maximum.at(tail, data.user[data.mask(CONTEXT_SPLITS)], data.order[data.mask(CONTEXT_SPLITS)])
  return "all" if np.mean(data.order[held] <= tail[data.user[held]]) > 0.5 else "before_target"


def resolve_user_ids(settings: HybridSettings, data: InteractionData) -> bool:
  """User ID factors help only users seen in training; where the held-out users are mostly
  new (inductive evaluation), training with them lets p_u explain what the history terms should
  learn, so they are left out."""
  if settings.use_user_ids != "auto":
    return bool(settings.use_user_ids)
  held = data.mask(("valid", "test"))
  if not held.any():
    return True
  return bool(np.mean(data.train_users()[data.user[held]]) >= 0.5)


def build_histories(data: InteractionData, rows: np.ndarray, mode: str, length: int):
  """Histories of the target ``rows``: (hist [H, L], example_hist [n], hist_domain [H],
  hist_user [H]). In "all" mode rows of the same user and domain share one history."""
  ctx, start = _context_index(data)
  users = data.user[rows]
  pad = data.num_items
  if mode == "all":
    keys, example_hist = np.unique(users * len(data.domains) + data.domain[rows], return_inverse=True)
    hist_user, hist_domain = keys // len(data.domains), keys % len(data.domains)
    lo, hi = start[hist_user], start[hist_user + 1]
    length = int(min(length, max(1, (hi - lo).max(initial=1))))
    idx = hi[:, None] - 1 - np.arange(length)[None, :]
    ok = idx >= lo[:, None]
  elif mode == "before_target":
    span = data.order.max() - data.order.min() + 1.0
    key = data.user[ctx] * span + (data.order[ctx] - data.order.min())
    target = users * span + (data.order[rows] - data.order.min())
    end = np.searchsorted(key, target, side="left")     # strictly before the target
    idx = end[:, None] - 1 - np.arange(length)[None, :]
    ok = idx >= start[users][:, None]
    example_hist = np.arange(len(rows))
    hist_user, hist_domain = users, data.domain[rows]
  else:
    raise ValueError(f"unknown history context {mode!r}; use before_target or all")
  hist = np.where(ok, data.item[ctx[np.clip(idx, 0, len(ctx) - 1)]], pad).astype(np.int32)
  return hist, example_hist.astype(np.int32), hist_domain.astype(np.int32), hist_user.astype(np.int32)


def tag_vocabulary(data: InteractionData) -> list[str]:
  return sorted({t for tags in data.item_tags for t in tags})


def tag_matrix(data: InteractionData, users: bool = False) -> np.ndarray:
  """[num_items + 1, num_tags] (or [num_users + 1, num_user_tags]): each row's tags with
  weights summing to 1 (mean pooling); the last row (unknown / padding) has none."""
  rows = data.user_tags if users else data.item_tags
  vocab = {t: n for n, t in enumerate(sorted({t for tags in rows for t in tags}))}
  out = np.zeros((len(rows) + 1, len(vocab)), np.float32)
  for i, tags in enumerate(rows):
    for t in tags:
      out[i, vocab[t]] = 1.0 / len(tags)
  return out


def _history_length(s: HybridSettings, context: str) -> int:
  return s.history_length_all if context == "all" else s.history_length


def standardize(vectors: np.ndarray, pca_dim: int = 0) -> np.ndarray:
  """Centred over the catalog and scaled to unit mean norm (one scale for all dimensions, so
  the text geometry is kept and L2 penalties on projections mean the same for any encoder),
  with a zero padding row appended. ``pca_dim`` > 0 keeps that many principal components
  (cheaper projections on large catalogs)."""
  v = vectors - vectors.mean(0)
  if 0 < pca_dim < v.shape[1]:
    _, _, vt = np.linalg.svd(v[:: max(1, len(v) // 20000)], full_matrices=False)
    v = v @ vt[:pca_dim].T
  v = v / (np.linalg.norm(v, axis=1).mean() + 1e-12)
  return np.vstack([v, np.zeros((1, v.shape[1]))]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# The fitted model.

class FittedHybrid:
  """A trained hybrid model with the classical models' interface."""

  def __init__(self, model: HybridRecommender, data: InteractionData, settings: HybridSettings,
               context: str, text, profile, profile_rows, log: list[dict], tags):
    self.model, self.data, self.settings, self.context = model, data, settings, context
    self.text, self.profile, self.profile_rows, self.log = text, profile, profile_rows, log
    self.tags, self.user_tags = tags["items"], tags["users"]
    self.name = "hybrid"
    self._domain_of_item = jnp.asarray(np.append(data.domain_of_item(), -1).astype(np.int32))
    self.refresh()

  def refresh(self):
    """Re-reads the model's parameters (after ``nnx.update``, e.g. a checkpoint restore)."""
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def user_vectors(state, batch, text, profile, domain_of_item):
      m = nnx.merge(graphdef, state)
      return m.example_user_vectors(batch, text, domain_of_item, profile,
                                    user_tags=self.user_tags), m.user_bias_of(
          batch["user"], batch["domain"])

    @jax.jit
    def item_vectors(state, text, tags):
      return nnx.merge(graphdef, state).item_vectors(text, tags=tags)

    self._user_vectors = lambda batch: user_vectors(state, batch, self.text, self.profile,
                                                    self._domain_of_item)
    self._items = item_vectors(state, self.text, self.tags)

  def _query_batch(self, queries: Queries) -> dict[str, np.ndarray]:
    data = self.data
    known = queries.user >= 0
    if queries.history is not None:  # users from outside the log: one history per query
      hist = np.where(queries.history >= 0, queries.history, data.num_items).astype(np.int32)
      hist = hist[:, :_history_length(self.settings, self.context)]
      example_hist = np.arange(len(queries), dtype=np.int32)
      hist_domain = queries.domain.astype(np.int32)
      hist_user = np.where(known, queries.user, 0)
    else:
      hist, example_hist, hist_domain, hist_user = build_histories(
          data, queries.row, self.context, _history_length(self.settings, self.context))
    return {"self_in_history": np.zeros(len(queries), np.int32),
            "item": queries.item.astype(np.int32), "hist": hist, "hist_domain": hist_domain,
            "hist_profile": self.profile_rows[hist_user], "example_hist": example_hist,
            "user": np.where(known, queries.user, data.num_users).astype(np.int32),
            "domain": queries.domain.astype(np.int32)}

  def user_vectors(self, queries: Queries):
    return self._user_vectors(self._query_batch(queries))

  def score_pairs(self, queries: Queries) -> np.ndarray:
    users, user_bias = self.user_vectors(queries)
    items, item_bias = self._items
    item = jnp.asarray(queries.item)
    score = user_bias + item_bias[item] + jnp.sum(users * items[item], -1)
    return np.asarray(score, np.float64)

  def score_catalog(self, queries: Queries, domain: int) -> np.ndarray:
    users, user_bias = self.user_vectors(queries)
    items, item_bias = self._items
    lo, hi = self.data.offsets[domain], self.data.offsets[domain + 1]
    return np.asarray(users @ items[lo:hi].T + item_bias[lo:hi] + user_bias[:, None], np.float32)


# ------------------------------------------------------------------------------------------------
# Training.

def _examples(data: InteractionData):
  """Per domain: the train rows it learns from (implicit domains: positives only)."""
  out = {}
  for d, spec in enumerate(data.domains):
    sel = data.mask(("train",), d)
    if spec["task"] != "rating":
      sel &= data.label > 0
    rows = np.flatnonzero(sel)
    if len(rows):
      out[d] = rows
  return out


def _loss_fn(graphdef, tables, settings: HybridSettings, task: str, lo: int, hi: int,
             num_train: float):
  """loss(params, batch, deltas) for batches of one domain (``task``, items [lo, hi))."""

  def reg(m: HybridRecommender):
    s = settings
    total = s.reg_factors * (jnp.sum(tables["user_count_w"][:, None] * m.user_factors.value ** 2) +
                             jnp.sum(tables["item_count_w"][:, None] * m.item_factors.value ** 2))
    total += s.reg_user_bias * jnp.sum(m.user_bias.value ** 2)
    total += s.reg_item_bias * jnp.sum(m.item_bias.value ** 2)
    total += s.reg_history * jnp.sum(m.history_factors.value ** 2)
    total += s.reg_tags * jnp.sum(m.tag_embeddings.value ** 2)
    total += s.reg_user_tags * jnp.sum(m.user_tag_embeddings.value ** 2)
    if m.config.text_dim:
      total += s.reg_text * (jnp.sum(m.item_text.kernel.value ** 2) +
                             jnp.sum(m.profile_text.kernel.value ** 2))
      total += s.reg_history_text * jnp.sum(m.history_text.kernel.value ** 2)
      total += s.reg_mlp * (jnp.sum(m.history_mlp_in.kernel.value ** 2) +
                            jnp.sum(m.history_mlp_out.kernel.value ** 2))
    return total / num_train

  def loss(params, batch, user_delta=None, item_delta=None):
    m = nnx.merge(graphdef, params)
    users = m.example_user_vectors(batch, tables["text"], tables["domain_of_item"],
                                   tables["profile"], user_delta, tables["user_tags"])
    w = batch["weight"]
    if task == "rating":
      items, item_bias = m.item_vectors(tables["text"], batch["item"], item_delta, tables["tags"])
      pred = m.user_bias_of(batch["user"], batch["domain"]) + item_bias + jnp.sum(users * items, -1)
      data_loss = jnp.sum(w * (pred - batch["label"]) ** 2) / jnp.maximum(w.sum(), 1.0)
    elif settings.num_negatives <= 0:  # full-catalog softmax
      items, item_bias = m.item_vectors(tables["text"], jnp.arange(lo, hi), item_delta,
                                        tables["tags"])
      logits = users @ items.T + item_bias
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["item"] - lo)
      data_loss = jnp.sum(w * nll) / jnp.maximum(w.sum(), 1.0)
    else:  # sampled softmax: shared negatives, logQ-corrected, accidental hits masked
      neg = batch["negatives"]
      pos_vec, pos_bias = m.item_vectors(tables["text"], batch["item"], None, tables["tags"])
      neg_vec, neg_bias = m.item_vectors(tables["text"], neg, item_delta, tables["tags"])
      logq = tables["log_q"]
      pos_logit = jnp.sum(users * pos_vec, -1) + pos_bias - logq[batch["item"]]
      neg_logit = users @ neg_vec.T + neg_bias - logq[neg]
      neg_logit = jnp.where(neg[None, :] == batch["item"][:, None], -1e9, neg_logit)
      logits = jnp.concatenate([pos_logit[:, None], neg_logit], 1)
      nll = -jax.nn.log_softmax(logits, -1)[:, 0]
      data_loss = jnp.sum(w * nll) / jnp.maximum(w.sum(), 1.0)
    return data_loss, (data_loss, reg(m))

  return loss


def fit_hybrid(data: InteractionData, settings: HybridSettings = HybridSettings(), *,
               text: np.ndarray | None = None, profile: np.ndarray | None = None,
               profile_rows: np.ndarray | None = None, verbose: bool = True) -> FittedHybrid:
  """Trains on the train split. ``text``: [num_items, T] frozen-encoder item vectors;
  ``profile``: [P, T] profile vectors with ``profile_rows[u]`` the row of user u."""
  s = settings
  context = resolve_context(s, data)
  text_dim = 0 if text is None else (min(s.text_pca_dim, text.shape[1]) if s.text_pca_dim
                                      else text.shape[1])
  text_table = standardize(text, s.text_pca_dim) if text is not None else np.zeros((data.num_items + 1, 1), np.float32)
  if profile is not None and s.use_profile:
    profile_table = standardize(profile)
    profile_rows = np.asarray(profile_rows, np.int32)
  else:
    profile_table = np.zeros((1, max(text_dim, 1)), np.float32)
    profile_rows = np.zeros(data.num_users, np.int32)
  config = HybridConfig(num_users=data.num_users, num_items=data.num_items,
                        num_domains=len(data.domains), text_dim=text_dim, dim=s.dim,
                        num_tags=len(tag_vocabulary(data)) if s.use_tags else 0,
                        num_user_tags=(len({t for x in data.user_tags for t in x})
                                       if s.use_user_tags else 0),
                        use_biases=s.use_biases, use_ids=s.use_ids,
                        use_user_ids=resolve_user_ids(s, data), use_history=s.use_history,
                        use_text=s.use_text and text is not None,
                        use_history_text=s.use_history_text and text is not None,
                        history_text_projection=s.history_text_projection,
                        use_profile=s.use_profile and profile is not None,
                        cross_domain=s.cross_domain)
  model = HybridRecommender(config, rngs=nnx.Rngs(s.seed))
  # A fresh model predicts each explicit domain's train mean.
  for d, spec in enumerate(data.domains):
    train = data.mask(("train",), d)
    if spec["task"] == "rating" and train.any():
      model.global_bias.value = model.global_bias.value.at[d].set(data.label[train].mean())

  examples = _examples(data)
  all_rows = np.concatenate(list(examples.values()))
  hist, example_hist, hist_domain, hist_user = build_histories(
      data, all_rows, context, _history_length(s, context))
  position = {}
  offset = 0
  for d, rows in examples.items():
    position[d] = np.arange(offset, offset + len(rows))
    offset += len(rows)
  num_train = float(len(all_rows))
  counts = np.bincount(data.user[all_rows], minlength=data.num_users + 1).astype(np.float32)
  item_counts = np.bincount(data.item[all_rows], minlength=data.num_items + 1).astype(np.float32)
  # Sampling distribution of negatives, per domain (probabilities sum to 1 within a domain).
  q_item = np.zeros(data.num_items + 1)
  weight = (item_counts[:-1].astype(np.float64) + 1.0) ** s.negative_power
  dom_of = data.domain_of_item()
  for d in range(len(data.domains)):
    sel = dom_of == d
    q_item[:-1][sel] = weight[sel] / weight[sel].sum()
  tag_table = tag_matrix(data) if s.use_tags else np.zeros((data.num_items + 1, 0), np.float32)
  user_tag_table = (tag_matrix(data, users=True) if s.use_user_tags
                    else np.zeros((data.num_users + 1, 0), np.float32))
  tables = {"tags": jnp.asarray(tag_table), "user_tags": jnp.asarray(user_tag_table),
            "text": jnp.asarray(text_table), "profile": jnp.asarray(profile_table),
            "domain_of_item": jnp.asarray(np.append(data.domain_of_item(), -1).astype(np.int32)),
            "log_q": jnp.asarray(np.log(q_item + 1e-12).astype(np.float32)),
            "user_count_w": jnp.asarray(np.sqrt(counts)),
            "item_count_w": jnp.asarray(np.sqrt(item_counts))}

  batch_size = {d: min(s.batch_size, len(rows)) for d, rows in examples.items()}
  width = {d: min(batch_size[d], len(np.unique(example_hist[position[d]]))) for d in examples}
  steps_per_epoch = {d: -(-len(rows) // batch_size[d]) for d, rows in examples.items()}
  total_steps = s.epochs * sum(steps_per_epoch.values())
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, s.learning_rate, max(1, int(s.warmup_fraction * total_steps)), max(total_steps, 2),
      end_value=0.1 * s.learning_rate)
  tx = optax.adam(schedule)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)

  steps = {}
  for d in examples:
    lo, hi = int(data.offsets[d]), int(data.offsets[d + 1])
    task = data.domains[d]["task"]
    loss = _loss_fn(graphdef, tables, s, task, lo, hi, num_train)
    steps[d] = _make_step(loss, tx, s, batch_size[d] if task == "rating" else (
        s.num_negatives if s.num_negatives > 0 else hi - lo))

  rng = np.random.default_rng(s.seed)
  full_batches = {}  # a full-batch domain's batch does not change between epochs: build it once
  log, t0 = [], time.time()
  for epoch in range(s.epochs):
    schedule_rows = []
    for d, rows in examples.items():
      perm = rng.permutation(len(rows))
      for k in range(steps_per_epoch[d]):
        schedule_rows.append((d, perm[k * batch_size[d]:(k + 1) * batch_size[d]]))
    order = rng.permutation(len(schedule_rows))
    sums = {}
    for n in order:
      d, chosen = schedule_rows[n]
      if d in full_batches:
        batch = full_batches[d]
      else:
        batch = _train_batch(data, examples[d], position[d], chosen, batch_size[d], width[d], hist,
                             example_hist, hist_domain, hist_user, profile_rows,
                             context == "before_target")
        if steps_per_epoch[d] == 1:
          full_batches[d] = batch = jax.device_put(batch)
      if s.num_negatives > 0 and data.domains[d]["task"] != "rating":
        lo, hi = data.offsets[d], data.offsets[d + 1]
        batch = dict(batch, negatives=(lo + rng.choice(hi - lo, s.num_negatives,
                                                       p=q_item[lo:hi])).astype(np.int32))
      params, opt_state, metrics = steps[d](params, opt_state, batch)
      for key, value in metrics.items():
        sums.setdefault(f"{data.names[d]}/{key}", []).append(value)
    entry = {"epoch": epoch + 1, "seconds": time.time() - t0} | {
        k: float(np.mean(jax.device_get(v))) for k, v in sums.items()}
    log.append(entry)
    if verbose and (epoch + 1 == s.epochs or (epoch + 1) % max(1, s.epochs // 5) == 0):
      print("    epoch " + " ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "epoch")
            + f" ({entry['epoch']}/{s.epochs})", flush=True)
  model = nnx.merge(graphdef, params)
  return FittedHybrid(model, data, s, context, tables["text"], tables["profile"], profile_rows, log,
                      {"items": tables["tags"], "users": tables["user_tags"]})


def _make_step(loss, tx, s: HybridSettings, num_item_vectors: int):
  """The jitted update; ``num_item_vectors``: item vectors one batch's loss reads (the APR
  perturbation's shape): the batch's targets (ratings) or the domain's catalog (softmax)."""

  def total(params, batch):
    data_loss, (plain, reg) = loss(params, batch)
    return data_loss + reg, (plain, reg)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch):
    (_, (plain, reg)), grads = jax.value_and_grad(total, has_aux=True)(params, batch)
    metrics = {"loss": plain, "reg": reg}
    if s.adversarial == "apr":
      # APR: the worst-case perturbation of the user and item vectors within an L2 ball.
      dim = params["item_factors"].value.shape[-1]
      zeros_u = jnp.zeros((batch["user"].shape[0], dim))
      zeros_i = jnp.zeros((num_item_vectors, dim))
      gu, gi = jax.grad(lambda du, di: loss(params, batch, du, di)[0], argnums=(0, 1))(zeros_u, zeros_i)
      scale = lambda g: s.adversarial_eps * g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
      du, di = jax.lax.stop_gradient(scale(gu)), jax.lax.stop_gradient(scale(gi))
      adv, adv_grads = jax.value_and_grad(lambda p: loss(p, batch, du, di)[0])(params)
      grads = jax.tree.map(lambda g, a: g + s.adversarial_weight * a, grads, adv_grads)
      metrics["adversarial"] = adv
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def _train_batch(data, rows, positions, chosen, batch_size, width, hist, example_hist,
                 hist_domain, hist_user, profile_rows, before_target):
  """One domain's batch; ``width`` distinct histories (padded), as the jitted step's shapes
  must not change from batch to batch."""
  n = len(chosen)
  pad = batch_size - n
  chosen = np.concatenate([chosen, np.zeros(pad, chosen.dtype)])
  pos = positions[chosen]
  target = rows[chosen]
  used, inverse = np.unique(example_hist[pos], return_inverse=True)
  hist_rows = np.concatenate([used, np.full(width - len(used), used[0])])
  return {
      "hist": hist[hist_rows], "hist_domain": hist_domain[hist_rows],
      "hist_profile": profile_rows[hist_user[hist_rows]], "example_hist": inverse.astype(np.int32),
      "user": data.user[target].astype(np.int32), "domain": data.domain[target].astype(np.int32),
      "item": data.item[target].astype(np.int32), "label": data.label[target].astype(np.float32),
      "weight": np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32),
      # Exact membership (histories are capped): a target counted in its own history.
      "self_in_history": (hist[example_hist[pos]] == data.item[target][:, None]).any(1).astype(
          np.int32) * int(not before_target),
  }
