"""Training the hybrid model on cached frozen-encoder text vectors, at MF speed, on the device
mesh through the one loop (``training/loop.py``).

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
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from crossrec_jax import sharding
from crossrec_jax.interactions import InteractionData, Queries
from crossrec_jax.models.hybrid import (ITEMS, USERS, HybridConfig, HybridRecommender,
                                       padded_rows)
from crossrec_jax.training import adversarial, loop, optim
from crossrec_jax.training.inputs import (HybridSettings, _history_length, build_histories,
                                          flat_histories, resolve_context, resolve_user_ids,
                                          standardize, tag_matrix, tag_vocabulary, window_batch,
                                          window_index)
from crossrec_jax.training.steps import TrainState, state_shardings


# ------------------------------------------------------------------------------------------------
# The fitted model.

class FittedHybrid:
  """A trained hybrid model with the classical models' interface."""

  def __init__(self, model: HybridRecommender, data: InteractionData, settings: HybridSettings,
               context: str, text, profile, profile_rows, log: list[dict], tags):
    self.model, self.data, self.settings, self.context = model, data, settings, context
    rows = padded_rows(data.num_items)
    self.text, self.tags = pad_rows(text, rows), pad_rows(tags["items"], rows)
    self.profile, self.profile_rows, self.log = profile, profile_rows, log
    self.user_tags = tags["users"]
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
            "item": queries.item.astype(np.int32), **flat_histories(hist, data.num_items),
            "hist_domain": hist_domain,
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


def _loss_fn(graphdef, default_tables, settings: HybridSettings, task: str, lo: int, hi: int,
             num_train: float):
  """loss(params, batch, deltas) for batches of one domain (``task``, items [lo, hi)).
  ``tables``: the input tables (``TrainingSetup.tables``); the jitted step passes them placed
  on the mesh (row-sharded), so no replicated copy of the catalog is baked into it."""

  def reg(m: HybridRecommender, tables):
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

  def loss(params, batch, user_delta=None, item_delta=None, text=None, tables=default_tables):
    """``text``: the item text table to use instead of the cached one (the tune mode passes one
    with the batch's items re-encoded by the encoder being fine-tuned)."""
    m = nnx.merge(graphdef, params)
    text = tables["text"] if text is None else text
    users = m.example_user_vectors(batch, text, tables["domain_of_item"],
                                   tables["profile"], user_delta, tables["user_tags"])
    w = batch["weight"]
    if task == "rating":
      items, item_bias = m.item_vectors(text, batch["item"], item_delta, tables["tags"])
      pred = m.user_bias_of(batch["user"], batch["domain"]) + item_bias + jnp.sum(users * items, -1)
      data_loss = jnp.sum(w * (pred - batch["label"]) ** 2) / jnp.maximum(w.sum(), 1.0)
    elif settings.num_negatives <= 0:  # full-catalog softmax
      items, item_bias = m.item_vectors(text, jnp.arange(lo, hi), item_delta,
                                        tables["tags"])
      logits = users @ items.T + item_bias
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["item"] - lo)
      data_loss = jnp.sum(w * nll) / jnp.maximum(w.sum(), 1.0)
    else:  # sampled softmax: shared negatives, logQ-corrected, accidental hits masked
      neg = batch["negatives"]
      pos_vec, pos_bias = m.item_vectors(text, batch["item"], None, tables["tags"])
      neg_vec, neg_bias = m.item_vectors(text, neg, item_delta, tables["tags"])
      logq = tables["log_q"]
      pos_logit = jnp.sum(users * pos_vec, -1) + pos_bias - logq[batch["item"]]
      neg_logit = users @ neg_vec.T + neg_bias - logq[neg]
      neg_logit = jnp.where(neg[None, :] == batch["item"][:, None], -1e9, neg_logit)
      logits = jnp.concatenate([pos_logit[:, None], neg_logit], 1)
      nll = -jax.nn.log_softmax(logits, -1)[:, 0]
      data_loss = jnp.sum(w * nll) / jnp.maximum(w.sum(), 1.0)
    return data_loss, (data_loss, reg(m, tables))

  return loss


@dataclasses.dataclass
class TrainingSetup:
  """What a fit needs besides the parameters: the fresh model, the input tables, the train
  rows per domain with their histories, batch shapes and the negatives' distribution. The tune
  mode trains on the same batches."""
  model: HybridRecommender
  context: str
  tables: dict[str, Any]
  profile_rows: np.ndarray
  examples: dict[int, np.ndarray]
  position: dict[int, np.ndarray]
  histories: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # hist, example, domain, user
  batch_size: dict[int, int]
  width: dict[int, int]
  steps_per_epoch: dict[int, int]
  q_item: np.ndarray
  num_train: float
  windows: Any = None  # inputs.Windows for prefix histories (before_target), else None
  window_domains: tuple[int, ...] = ()  # the domains whose batches use ``windows``


def training_setup(data: InteractionData, settings: HybridSettings, text=None, profile=None,
                   profile_rows=None) -> TrainingSetup:
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
  # Tables the model reads whole are padded to its (shardable) row counts; the padding rows
  # are zero, and no index reaches them.
  item_rows, user_rows = padded_rows(data.num_items), padded_rows(data.num_users)
  tables = {"tags": pad_rows(tag_table, item_rows), "user_tags": jnp.asarray(user_tag_table),
            "text": pad_rows(text_table, item_rows), "profile": jnp.asarray(profile_table),
            "domain_of_item": jnp.asarray(np.append(data.domain_of_item(), -1).astype(np.int32)),
            "log_q": jnp.asarray(np.log(q_item + 1e-12).astype(np.float32)),
            "user_count_w": pad_rows(np.sqrt(counts), user_rows),
            "item_count_w": pad_rows(np.sqrt(item_counts), item_rows)}
  batch_size = {d: min(s.batch_size, len(rows)) for d, rows in examples.items()}
  width = {d: min(batch_size[d], len(np.unique(example_hist[position[d]]))) for d in examples}
  steps_per_epoch = {d: -(-len(rows) // batch_size[d]) for d, rows in examples.items()}
  windows, window_domains = None, ()
  if context == "before_target":
    windows = window_index(data, all_rows, _history_length(s, context))
    window_domains = tuple(d for d in examples if steps_per_epoch[d] == 1 and _window_gain(
        windows, position[d], data.user[examples[d]]) >= WINDOW_GAIN)
  return TrainingSetup(model, context, tables, profile_rows, examples, position,
                       (hist, example_hist, hist_domain, hist_user), batch_size, width,
                       steps_per_epoch, q_item, float(len(all_rows)), windows, window_domains)


# Prefix sums (``Windows``) replace per-example histories where the histories hold this many
# times more entries than the users' sequences: below it the scan costs more than it saves
# (measured on this 2-core CPU: break-even near 13x; 2.6x faster steps at 35x).
WINDOW_GAIN = 16.0


def _window_gain(windows, positions, users) -> float:
  """History entries of per-example histories / entries of the users' sequences, for one
  full-batch domain (every example of a user in the one batch)."""
  begin, end = windows.begin[positions], windows.end[positions]
  uniq, inv = np.unique(users, return_inverse=True)
  lo = np.full(len(uniq), np.iinfo(np.int64).max)
  hi = np.zeros(len(uniq), np.int64)
  np.minimum.at(lo, inv, begin)
  np.maximum.at(hi, inv, end)
  return float(np.sum(end - begin)) / float(np.sum(hi - lo + 1))


def pad_rows(table, rows: int):
  """``table`` with zero rows appended up to ``rows`` (the model's padded item / user rows)."""
  if table.shape[0] >= rows:
    return table
  return jnp.pad(jnp.asarray(table), [(0, rows - table.shape[0])] + [(0, 0)] * (table.ndim - 1))


def _epoch_schedule(setup: TrainingSetup, rng) -> list[tuple[int, np.ndarray]]:
  """(domain, example positions) of one epoch's batches, domains interleaved at random."""
  rows = []
  for d, examples in setup.examples.items():
    perm = rng.permutation(len(examples))
    for k in range(setup.steps_per_epoch[d]):
      rows.append((d, perm[k * setup.batch_size[d]:(k + 1) * setup.batch_size[d]]))
  return [rows[n] for n in rng.permutation(len(rows))]


class HybridBatches(loop.ResumableIterator):
  """Endless (domain, device batch, examples) triples, epoch after epoch, from one numpy
  generator. Its state is the generator's state at the start of the current epoch and the
  batches already taken from it: ``set_state`` replays that epoch's draws (permutations and
  negatives, no batch building), so a resumed run sees exactly the batches an uninterrupted
  one would. ``put`` places a host batch on the devices."""

  def __init__(self, data: InteractionData, setup: TrainingSetup, settings: HybridSettings,
               put: Callable[[dict], dict] | None = None, rng=None):
    self.data, self.setup, self.settings = data, setup, settings
    self.put = put or jax.device_put
    self.rng = rng if rng is not None else np.random.default_rng(settings.seed)
    self.cache = {}  # a full-batch domain's batch does not change between epochs: kept on device
    self._start_epoch(0)

  def _start_epoch(self, epoch: int):
    self.epoch, self.index = epoch, 0
    self.epoch_rng = self.rng.bit_generator.state
    self.schedule = _epoch_schedule(self.setup, self.rng)

  def _negatives(self, d: int):
    s, data = self.settings, self.data
    if s.num_negatives <= 0 or data.domains[d]["task"] == "rating":
      return None
    lo, hi = data.offsets[d], data.offsets[d + 1]
    return (lo + self.rng.choice(hi - lo, s.num_negatives, p=self.setup.q_item[lo:hi])).astype(np.int32)

  def __next__(self):
    if self.index == len(self.schedule):
      self._start_epoch(self.epoch + 1)
    d, chosen = self.schedule[self.index]
    self.index += 1
    setup = self.setup
    if d in self.cache:
      batch = self.cache[d]
    else:
      host = _train_batch(self.data, setup.examples[d], setup.position[d], chosen,
                          setup.batch_size[d], setup.width[d], *setup.histories,
                          setup.profile_rows, setup.context == "before_target",
                          setup.windows if d in setup.window_domains else None)
      batch = self.put(host)
      if setup.steps_per_epoch[d] == 1:
        self.cache[d] = batch
    negatives = self._negatives(d)
    if negatives is not None:
      batch = dict(batch, **self.put({"negatives": negatives}))
    return d, batch, len(chosen)

  def get_state(self) -> bytes:
    return json.dumps({"epoch": self.epoch, "index": self.index, "rng": self.epoch_rng}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    self.rng.bit_generator.state = saved["rng"]
    self._start_epoch(saved["epoch"])
    for d, _ in self.schedule[:saved["index"]]:
      self._negatives(d)  # the draws those batches made
    self.index = saved["index"]


SEQUENCE_KEYS = ("seq_items", "seq_start")


@dataclasses.dataclass
class HybridTrainer:
  """What the loop needs to train the hybrid model: the initial state, its shardings, one
  jitted step per domain (a domain's batches have their own shapes and loss) and the batches."""
  data: InteractionData
  settings: HybridSettings
  setup: TrainingSetup
  mesh: Any
  graphdef: Any
  state_shardings: TrainState
  steps: dict[int, Callable]
  schedule: Callable[[int], Any]
  total_steps: int
  steps_per_epoch: int
  init_params: Any
  tx: Any
  tables: dict[str, Any]  # TrainingSetup.tables placed on the mesh

  def init_state(self) -> TrainState:
    init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                        opt_state=self.tx.init(p), rng=jax.random.key_data(
                                            jax.random.key(self.settings.seed))),
                   out_shardings=self.state_shardings)
    return init(self.init_params)

  def abstract_state(self):
    abstract = jax.eval_shape(lambda: self.init_state())
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.state_shardings)

  def step(self, state: TrainState, batch):
    d, arrays, _ = batch
    return self.steps[d](state, arrays, self.tables)

  def batches(self) -> HybridBatches:
    return HybridBatches(self.data, self.setup, self.settings, self.put)

  def put(self, host: dict) -> dict:
    """A host batch (the same on every process) as global arrays: the leading axis split over
    the batch axes of the mesh where it divides, else replicated."""
    n = int(np.prod([self.mesh.shape[a] for a in sharding.BATCH]))
    split, whole = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
    out = {}
    for k, v in host.items():
      v = np.asarray(v)
      # The users' sequences (prefix histories) are scanned whole: replicated, not split.
      sh = split if v.ndim and v.shape[0] % n == 0 and k not in SEQUENCE_KEYS else whole
      out[k] = jax.make_array_from_callback(v.shape, sh, lambda idx, v=v: v[idx])
    return out

  def fitted(self, params, log=()) -> FittedHybrid:
    """The trained network for evaluation and serving, on this process (every process of a
    multi-host run holds the whole model: its parameters are gathered)."""
    if jax.process_count() > 1:
      params = jax.tree.map(sharding.to_host, params)
    model = nnx.merge(self.graphdef, params)
    t = self.setup.tables
    return FittedHybrid(model, self.data, self.settings, self.setup.context, t["text"],
                        t["profile"], self.setup.profile_rows, list(log),
                        {"items": t["tags"], "users": t["user_tags"]})


def build_trainer(data: InteractionData, settings: HybridSettings = HybridSettings(), *,
                  text=None, profile=None, profile_rows=None, mesh=None,
                  rules=sharding.DEFAULT_RULES, total_steps: int = 0) -> HybridTrainer:
  """``total_steps`` 0: ``settings.epochs`` epochs; ``mesh`` None: every device on the data axis."""
  s = settings
  mesh = mesh if mesh is not None else sharding.create_mesh({"data": -1})
  setup = training_setup(data, s, text, profile, profile_rows)
  per_epoch = sum(setup.steps_per_epoch.values())
  total = total_steps or s.epochs * per_epoch
  optimizer = optim.OptimizerSettings({"all": optim.Group(s.learning_rate)}, total,
                                     warmup_fraction=s.warmup_fraction)
  tx, schedule = optim.make_optimizer(optimizer), optim.learning_rate(optimizer, s.learning_rate)
  graphdef, state = nnx.split(setup.model)
  logical = sharding.logical_axes_tree(state)
  params = nnx.to_pure_dict(state)
  abstract = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
      rng=jax.random.key_data(jax.random.key(0))), params)
  shardings_ = state_shardings(abstract, logical, tx, tuple(rules), mesh)
  params = jax.device_put(params, shardings_.params)
  tables = place_tables(setup.tables, mesh, rules)
  steps = {}
  for d in setup.examples:
    lo, hi = int(data.offsets[d]), int(data.offsets[d + 1])
    task = data.domains[d]["task"]
    loss = _loss_fn(graphdef, setup.tables, s, task, lo, hi, setup.num_train)
    steps[d] = _make_step(loss, tx, s, setup.batch_size[d] if task == "rating" else (
        s.num_negatives if s.num_negatives > 0 else hi - lo), shardings_, mesh)
  return HybridTrainer(data, s, setup, mesh, graphdef, shardings_, steps, schedule, total,
                       per_epoch, params, tx, tables)


# Logical axes of the input tables: the item-indexed ones are row-sharded like the item factors.
TABLE_AXES = {"text": (ITEMS, None), "tags": (ITEMS, None), "item_count_w": (ITEMS,),
              "user_count_w": (USERS,), "log_q": (ITEMS,), "domain_of_item": (ITEMS,)}


def place_tables(tables: dict, mesh, rules=sharding.DEFAULT_RULES) -> dict:
  """The tables on the mesh: item- / user-indexed ones padded to the model's rows and split by
  rows (``TABLE_AXES``), the small rest replicated."""
  out = {}
  for name, table in tables.items():
    axes = TABLE_AXES.get(name)
    if axes is None:
      out[name] = jax.device_put(table, sharding.replicated(mesh))
      continue
    table = jnp.asarray(table)
    rows = padded_rows(table.shape[0] - 1)
    pad = [(0, rows - table.shape[0])] + [(0, 0)] * (table.ndim - 1)
    table = jnp.pad(table, pad, constant_values=-1 if name == "domain_of_item" else 0)
    spec = sharding.spec_for(table.shape, axes, tuple(rules), mesh, name=f"tables/{name}")
    out[name] = jax.device_put(table, jax.sharding.NamedSharding(mesh, spec))
  return out


def fit_hybrid(data: InteractionData, settings: HybridSettings = HybridSettings(), *,
               text: np.ndarray | None = None, profile: np.ndarray | None = None,
               profile_rows: np.ndarray | None = None, verbose: bool = True,
               mesh=None) -> FittedHybrid:
  """Trains on the train split, for ``settings.epochs`` epochs, through the one loop (no
  checkpoints: ``served.train_and_evaluate`` is the run with them). ``text``: [num_items, T]
  frozen-encoder item vectors; ``profile``: [P, T] profile vectors with ``profile_rows[u]`` the
  row of user u."""
  trainer = build_trainer(data, settings, text=text, profile=profile,
                          profile_rows=profile_rows, mesh=mesh)
  log = []
  every = max(1, settings.epochs // 5)

  def on_log(step, scalars):
    epoch = step // trainer.steps_per_epoch
    log.append({"epoch": epoch} | {k.removeprefix("train/"): v for k, v in scalars.items()})
    if verbose and (step == trainer.total_steps or epoch % every == 0):
      print("    epoch " + " ".join(f"{k} {v:.4g}" for k, v in log[-1].items() if k != "epoch")
            + f" ({epoch}/{settings.epochs})", flush=True)

  result = loop.run_loop(
      loop.LoopSettings(total_steps=trainer.total_steps, log_every=trainer.steps_per_epoch),
      trainer.init_state(), trainer.step, trainer.batches(), start=0, on_log=on_log,
      examples=lambda batch: batch[2], show_progress=False)
  return trainer.fitted(result.state.params, log)


def _make_step(loss, tx, s: HybridSettings, num_item_vectors: int, shardings_: TrainState, mesh):
  """The jitted update, a pure function of (state, batch) with the state donated;
  ``num_item_vectors``: item vectors one batch's loss reads (the APR perturbation's shape): the
  batch's targets (ratings) or the domain's catalog (softmax)."""

  def total(params, batch, tables):
    data_loss, (plain, reg) = loss(params, batch, tables=tables)
    return data_loss + reg, (plain, reg)

  def step(state: TrainState, batch, tables):
    params = state.params
    loss_ = lambda p, b, du=None, di=None: loss(p, b, du, di, tables=tables)
    (_, (plain, reg)), grads = jax.value_and_grad(total, has_aux=True)(params, batch, tables)
    metrics = {"loss": plain, "reg": reg}
    if s.adversarial == "apr":  # the worst-case user / item vectors within an L2 ball
      adv, adv_grads = adversarial.apr_gradients(
          lambda p, b, du, di: loss_(p, b, du, di)[0], params, batch, batch["user"].shape[0],
          num_item_vectors, params["item_factors"].shape[-1], s.adversarial_eps)
      grads = adversarial.add_weighted(grads, adv_grads, s.adversarial_weight)
      metrics["adversarial"] = adv
    updates, opt_state = tx.update(grads, state.opt_state, params)
    return dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(params, updates),
                               opt_state=opt_state), metrics

  return jax.jit(step, in_shardings=(shardings_, None, None),
                 out_shardings=(shardings_, sharding.replicated(mesh)), donate_argnums=(0,))


def _train_batch(data, rows, positions, chosen, batch_size, width, hist, example_hist,
                 hist_domain, hist_user, profile_rows, before_target, windows=None):
  """One domain's batch; ``width`` distinct histories (padded), as the jitted step's shapes
  must not change from batch to batch. With ``windows`` (prefix histories) the histories are
  the users' sequences instead (``inputs.window_batch``)."""
  n = len(chosen)
  pad = batch_size - n
  chosen = np.concatenate([chosen, np.zeros(pad, chosen.dtype)])
  pos = positions[chosen]
  target = rows[chosen]
  examples = {
      "user": data.user[target].astype(np.int32), "domain": data.domain[target].astype(np.int32),
      "item": data.item[target].astype(np.int32), "label": data.label[target].astype(np.float32),
      "weight": np.concatenate([np.ones(n), np.zeros(pad)]).astype(np.float32)}
  if windows is not None:
    return {**window_batch(windows, pos, data.user[target], data.num_items),
            "hist_profile": profile_rows[data.user[target]], **examples}
  used, inverse = np.unique(example_hist[pos], return_inverse=True)
  hist_rows = np.concatenate([used, np.full(width - len(used), used[0])])
  return {
      **flat_histories(hist[hist_rows], data.num_items), "hist_domain": hist_domain[hist_rows],
      "hist_profile": profile_rows[hist_user[hist_rows]], "example_hist": inverse.astype(np.int32),
      **examples,
      # Exact membership (histories are capped): a target counted in its own history.
      "self_in_history": (hist[example_hist[pos]] == data.item[target][:, None]).any(1).astype(
          np.int32) * int(not before_target),
  }
