"""Serving a frozen or tune (``config.encoder_mode``) run: the fused model, exactly as it was evaluated.

``training.tune.load`` restores the network (the tune mode's where the run has one) and refits
the CF parts on the same prepared data set (they are deterministic functions of its train
split); the fusion weights are the ones tuned on valid. Users come as histories (the
interactions layout), linked as in training: a user known to training keeps its ID rows, any
other one is a cold user represented by its history, as at evaluation. History entries on items
outside the trained catalog are left out of the user's vector (the network's history terms are
indexed by trained items); they are still never recommended back to that user.

Candidates are the items of the items file. A trained item is scored as at evaluation. An item
the run was never trained on (text only) is scored with no retraining, as the network would
score a catalog item it has no interaction for: its text is encoded by the run's encoder (the
frozen one, or the tuned one in tune mode), mapped by the run's standardisation of the catalog's
text vectors and projected by the network's item text projection, with ID factor zero and item
bias zero (what the L2 penalties leave an item with no train interaction); text-kNN scores it
from its frozen text vector like any catalog item. See ``fused_rows`` for the fusion.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from etils import epath

from crossrec_jax import fusion, ranking, served, text_cache
from crossrec_jax.data.from_config import resolve_model_checkpoint
from crossrec_jax.data.records import Interaction, Item
from crossrec_jax.errors import ScoringError
from crossrec_jax.interactions import InteractionData, Queries
from crossrec_jax.training import tune
from crossrec_jax.training.inputs import apply_standardizer, standardizer, tag_vocabulary

ROW_BUDGET = 1 << 24   # scores per fused [users, catalog] block (64 MB of float32)


class HistoryQueries:
  """Builds ``Queries`` for people from outside the interaction log."""

  def __init__(self, data: InteractionData, history_length: int):
    self.data, self.length = data, history_length
    self.index = {(d["name"], i): int(data.offsets[k]) + n
                  for k, (d, ids) in enumerate(zip(data.domains, data.item_ids))
                  for n, i in enumerate(ids)}
    self.user_index = {k: n for n, k in enumerate(data.user_keys)}
    self.known = data.train_users()

  def __call__(self, people: list[tuple[int, list[Interaction]]], domain: int, items=None) -> Queries:
    """``people``: (user index or -1, history); one query per person (catalog scoring), or per
    (person, item) pair when ``items`` (global indices, one per person) is given."""
    n, num_items = len(people), self.data.num_items
    history = np.full((n, self.length), -1, np.int64)
    rows, cols = [], []
    for k, (_, hist) in enumerate(people):
      newest_first = [self.index[(x.domain, x.item_id)] for x in
                      sorted(hist, key=lambda x: x.order, reverse=True)
                      if (x.domain, x.item_id) in self.index]
      seen = list(dict.fromkeys(newest_first))[:self.length]
      history[k, :len(seen)] = seen
      rows += [k] * len(seen)
      cols += seen
    context = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, num_items))
    user = np.array([u if u >= 0 and self.known[u] else -1 for u, _ in people], np.int64)
    item = np.zeros(n, np.int64) if items is None else np.asarray(items, np.int64)
    return Queries(user=user, domain=np.full(n, domain, np.int64), item=item,
                   label=np.zeros(n), context=context, row=np.full(n, -1, np.int64),
                   history=history)

  def user_of(self, key: str) -> int:
    return self.user_index.get(key, -1)


@dataclasses.dataclass
class NewItems:
  """A request's items that the run was not trained on, per domain index, in column order."""
  ids: dict[int, list[str]]
  vectors: dict[int, np.ndarray]       # [m, dim] network item vectors (ID factor 0, bias 0)
  text_knn: dict[int, sp.csc_matrix]   # [num_items, m] text-kNN similarity columns

  def count(self, domain: int) -> int:
    return len(self.ids.get(domain, ()))


class NewItemText:
  """Text vectors of new items, made as the run made its catalog's: the frozen encoder's
  mean-pooled vectors (``text_cache.TextEncoder``, the encoder ``cached_vectors`` ran over the
  catalog) for text-kNN; for the network, the run's encoder (tuned in tune mode) mapped by the
  standardisation of the catalog's frozen vectors that the network was trained with. Encoders
  load on first use: a request with trained items only loads none."""

  def __init__(self, workdir, config, mode: str, model: served.ServedModel, data: InteractionData):
    self.workdir, self.config, self.mode, self.model, self.data = workdir, config, mode, model, data
    self._frozen = self._tuned = self._norm = None

  def _directory(self) -> str:
    return str(resolve_model_checkpoint(self.config, self.workdir))

  def frozen_encoder(self) -> text_cache.TextEncoder:
    if self._frozen is None:
      self._frozen = text_cache.TextEncoder(self._directory())
    return self._frozen

  def tuned_encoder(self) -> text_cache.TextEncoder:
    """The encoder of the run's final tune-mode checkpoint (the one ``tune.load`` served)."""
    if self._tuned is None:
      encoder = tune.tuned_encoder(self.workdir, self.config, self.model.hybrid.model)
      self._tuned = text_cache.TextEncoder(self._directory(), encoder=encoder)
    return self._tuned

  def standardizer(self) -> dict[str, np.ndarray]:
    if self._norm is None:
      catalog = text_cache.cached_vectors(
          self._directory(), self.data.item_texts, self.config.data.item_max_length,
          cache_dir=epath.Path(self.workdir) / "text_cache", encoder=self.frozen_encoder(),
          progress=False)   # the run's own cache: read, not encoded again
      self._norm = standardizer(catalog, self.model.hybrid.settings.text_pca_dim)
    return self._norm

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(network text vectors [m, P], frozen text vectors [m, T]) of ``texts``."""
    length = self.config.data.item_max_length
    frozen = self.frozen_encoder().encode(texts, length)
    network = frozen if self.mode == "frozen" else self.tuned_encoder().encode(texts, length)
    return np.asarray(apply_standardizer(network, self.standardizer()), np.float32), frozen


class HybridModel:
  """A frozen or tune run's served model with the ``serving.scorer.Scorer`` engine interface."""

  def __init__(self, model: served.ServedModel, data: InteractionData, step: int, mode: str,
               new_text: NewItemText):
    self.model, self.data, self.step, self.mode, self.new_text = model, data, step, mode, new_text
    self.domains = list(data.names)
    self.tasks = {d["name"]: d["task"] for d in data.domains}
    s = model.hybrid.settings
    self.queries = HistoryQueries(
        data, s.history_length_all if model.hybrid.context == "all" else s.history_length)

  @classmethod
  def load(cls, workdir, config, secret, mode: str) -> "HybridModel":
    model, data, step = tune.load(workdir, config, secret)  # the tune mode's model if it ran
    return cls(model, data, step, mode, NewItemText(workdir, config, mode, model, data))

  # -- new items ---------------------------------------------------------------------------------
  def new_items(self, keys, items: dict[tuple[str, str], Item]) -> NewItems:
    """``keys`` ((domain, item_id), none of them trained) as ``NewItems``."""
    out = NewItems({}, {}, {})
    if not keys:
      return out
    net = self.model.hybrid.model
    c = net.config
    if not (c.use_text and c.text_dim):
      raise ScoringError(
          f"{len(keys)} item(s) are not in the catalog this run was trained on, e.g. "
          f"{keys[:3]}, and its network has no item text projection (hybrid.use_text=False) to "
          "score them from their text; score trained items only, or retrain with them")
    network_text, frozen_text = self.new_text([items[k].text for k in keys])
    vectors = np.asarray(net.item_text(jnp.asarray(network_text)), np.float32)
    if c.num_tags:   # the item's known tags, mean-pooled as training pools them
      vocab = {t: n for n, t in enumerate(tag_vocabulary(self.data))}
      tags = np.zeros((len(keys), c.num_tags), np.float32)
      for row, key in enumerate(keys):
        known = [vocab[t] for t in items[key].tags if t in vocab]
        tags[row, known] = 1.0 / max(len(known), 1)
      vectors = vectors + tags @ np.asarray(net.tag_embeddings.value, np.float32)
    knn = self.model.cf.get("text_knn")
    columns = _text_knn_columns(knn, frozen_text) if knn is not None else None
    names = self.domains
    for d in sorted({names.index(k[0]) for k in keys}):
      rows = [n for n, k in enumerate(keys) if k[0] == names[d]]
      out.ids[d] = [keys[n][1] for n in rows]
      out.vectors[d] = vectors[rows]
      if columns is not None:
        out.text_knn[d] = columns[:, rows]
    return out

  def fused_rows(self, queries: Queries, domain: int, new: NewItems) -> np.ndarray:
    """[n, domain's catalog + its new items]: the catalog's columns are ``ServedModel.score_catalog``
    (the evaluation's scores); a new item's column is its network score where the domain is not
    fused, else its fused score. Each component is z-scored with the row statistics of the
    catalog's scores (the ones ``fusion.zscore_rows`` takes), so the catalog keeps its
    evaluation values and new items land on the same scale; item-kNN and EASE, which have no
    column for an item without interactions, contribute z = 0 to it: the row mean, neutral
    evidence, neither above nor below the user's typical item."""
    m = new.count(domain)
    if not m:
      return self.model.score_catalog(queries, domain)
    hybrid = self.model.hybrid
    users, user_bias = hybrid.user_vectors(queries)
    neural_new = np.asarray(users @ jnp.asarray(new.vectors[domain]).T + user_bias[:, None],
                            np.float32)
    neural = hybrid.score_catalog(queries, domain)
    weights = self.model.weights.get(domain)
    if not weights:
      return np.concatenate([neural, neural_new], 1)
    cold = self.model.cold.get(domain)
    boost = cold.boost if cold is not None else {}
    parts = {served.NEURAL: neural} | {n: c.score_catalog(queries, domain)
                                       for n, c in self.model.cf.items()
                                       if weights.get(n) or boost.get(n)}
    new_parts = {served.NEURAL: neural_new}
    if "text_knn" in parts:
      new_parts["text_knn"] = np.asarray((queries.context.astype(np.float32) @
                                          new.text_knn[domain]).todense(), np.float32)
    extra = np.zeros((len(queries), m), np.float32)
    for name, w in weights.items():
      # A new item has no train interaction: it is cold, so it also takes the cold terms.
      w = w + boost.get(name, 0.0)
      if w and name in new_parts:
        extra += w * _zscore_like(parts[name], new_parts[name])
    if cold is not None:
      extra += cold.offset
    return np.concatenate([np.asarray(fusion.fuse(parts, weights, cold)), extra], 1)

  # -- the engine interface ----------------------------------------------------------------------
  def _columns(self, items, wanted):
    """Per wanted domain index: (trained catalog items listed in ``items``, bool [N_d]), and the
    listed items the run was not trained on (``NewItems``)."""
    listed, fresh = {}, []
    for key in sorted(items):
      if key[0] not in wanted:
        continue
      g = self.queries.index.get(key)
      if g is None:
        fresh.append(key)
        continue
      d = self.domains.index(key[0])
      if d not in listed:
        listed[d] = np.zeros(self.data.offsets[d + 1] - self.data.offsets[d], bool)
      listed[d][g - self.data.offsets[d]] = True
    new = self.new_items(fresh, items)
    for d in new.ids:
      listed.setdefault(d, np.zeros(self.data.offsets[d + 1] - self.data.offsets[d], bool))
    return listed, new

  def _batch(self, people, persons):
    return [(self.queries.user_of(people.key(p)), people.histories[p]) for p in persons]

  def _chunk(self, chunk_users: int) -> int:
    widest = max(int(np.diff(self.data.offsets).max(initial=1)), 1)
    return max(1, min(chunk_users, ROW_BUDGET // widest))

  def recommend(self, people, items, wanted, k: int, chunk_users: int, progress=None):
    """Top-``k`` unseen candidates per person and wanted domain, fused as at evaluation."""
    listed, new = self._columns(items, wanted)
    persons = sorted(people.histories)
    chunk = self._chunk(chunk_users)
    for start in range(0, len(persons), chunk):
      part = persons[start:start + chunk]
      batch = self._batch(people, part)
      columns = collections.defaultdict(list)
      for d, trained in sorted(listed.items()):
        q = self.queries(batch, d)
        allowed = np.concatenate([trained, np.ones(new.count(d), bool)])
        scores = np.where(allowed, self.fused_rows(q, d, new), -np.inf).astype(np.float32)
        lo, hi = int(self.data.offsets[d]), int(self.data.offsets[d + 1])
        new_col = {i: j for j, i in enumerate(new.ids.get(d, ()))}
        seen_new = [(n, new_col[x.item_id]) for n, (_, hist) in enumerate(batch) for x in hist
                    if x.domain == self.domains[d] and x.item_id in new_col]
        exclude = ranking.padded_indices(sp.hstack([q.context[:, lo:hi], sp.csr_matrix(
            (np.ones(len(seen_new)), tuple(np.array(seen_new, np.int64).reshape(-1, 2).T)),
            shape=(len(batch), new.count(d)))], format="csr"))
        top_scores, top = ranking.streamed_top_k(lambda a, b: scores[:, a:b], scores.shape[1],
                                                 exclude, k=min(k, scores.shape[1]))
        ids = [str(i) for i in self.data.item_ids[d]] + new.ids.get(d, [])
        for n, person in enumerate(part):
          for rank, (j, s) in enumerate(zip(top[n], top_scores[n])):
            if j < 0:
              continue
            columns["user_id"].append(person)
            columns["domain"].append(self.domains[d])
            columns["rank"].append(rank + 1)
            columns["item_id"].append(ids[j])
            columns["score"].append(float(s))
      yield dict(columns)
      if progress is not None:
        progress.update(len(part))

  def score(self, people, items, pairs, chunk_users: int, progress=None):
    """Scores of (user_id, item_id, domain) pairs: clipped predicted ratings on rating domains,
    the fused (z-scored) score on implicit ones, which is what ranked them at evaluation."""
    fresh = sorted({(d, i) for _, i, d in pairs if (d, i) not in self.queries.index})
    new = self.new_items(fresh, items)
    new_col = {(self.domains[d], i): j for d, ids in new.ids.items() for j, i in enumerate(ids)}
    grouped = collections.defaultdict(list)   # domain -> [(user_id, item_id, person, column)]
    for u, i, d in pairs:
      dom = self.domains.index(d)
      lo, hi = int(self.data.offsets[dom]), int(self.data.offsets[dom + 1])
      g = self.queries.index.get((d, i))
      grouped[dom].append((u, i, people.of(d, u),
                           g - lo if g is not None else hi - lo + new_col[(d, i)]))
    chunk = self._chunk(chunk_users)
    for d, rows in grouped.items():
      spec, width = self.data.domains[d], int(self.data.offsets[d + 1] - self.data.offsets[d])
      persons = list(dict.fromkeys(p for _, _, p, _ in rows))
      for start in range(0, len(persons), chunk):
        row_of = {p: n for n, p in enumerate(persons[start:start + chunk])}
        sel = [r for r in rows if r[2] in row_of]
        full = self.fused_rows(self.queries(self._batch(people, row_of), d), d, new)
        score = full[[row_of[p] for _, _, p, _ in sel], [c for _, _, _, c in sel]]
        if spec["task"] == "rating":   # trained items: the pair scorer evaluation used
          trained = np.array([c < width for _, _, _, c in sel])
          if trained.any():
            picked = [r for r, t in zip(sel, trained) if t]
            q = self.queries(self._batch(people, [p for _, _, p, _ in picked]), d,
                             [self.data.offsets[d] + c for _, _, _, c in picked])
            score[trained] = self.model.score_pairs(q)
          score = np.clip(score, spec["min_rating"], spec["max_rating"])
        yield {"user_id": [u for u, _, _, _ in sel], "item_id": [i for _, i, _, _ in sel],
               "domain": [spec["name"]] * len(sel), "task": [spec["task"]] * len(sel),
               "score": np.asarray(score, np.float32)}
        if progress is not None:
          progress.update(len(sel))


def _zscore_like(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """``scores`` z-scored with the per-row mean and std that ``fusion.zscore_rows`` takes from
  ``reference`` (the same component's catalog scores; unscorable entries left out)."""
  ref = jnp.asarray(reference, jnp.float32)
  scored = ref > -1e30
  n = jnp.maximum(scored.sum(1, keepdims=True), 1)
  mean = jnp.where(scored, ref, 0.0).sum(1, keepdims=True) / n
  var = jnp.where(scored, (ref - mean) ** 2, 0.0).sum(1, keepdims=True) / n
  return np.asarray((jnp.asarray(scores, jnp.float32) - mean) / jnp.maximum(jnp.sqrt(var), 1e-6))


def _text_knn_columns(knn, frozen_new: np.ndarray, block: int = 1024) -> sp.csc_matrix:
  """[num_items, m]: column j holds new item j's k most similar catalog items (any domain) and
  their clipped cosines, as ``TextKNN`` builds a catalog item's column (vectors centred on the
  catalog mean), so ``context @ column`` is its text-kNN score."""
  mean = knn.vectors.mean(0)
  unit = lambda v: (v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
  catalog, fresh = jnp.asarray(unit(knn.vectors - mean)), unit(frozen_new - mean)
  n = len(knn.vectors)
  k = min(knn.k, n - 1)
  sims, rows = [], []
  for start in range(0, len(fresh), block):
    top, idx = jax.lax.top_k(jnp.asarray(fresh[start:start + block]) @ catalog.T, k)
    sims.append(np.maximum(np.asarray(top), 0.0))
    rows.append(np.asarray(idx))
  sim, rows = np.concatenate(sims).ravel(), np.concatenate(rows).ravel()
  return sp.csc_matrix((sim, rows, np.arange(0, len(fresh) * k + 1, k)), shape=(n, len(fresh)))
