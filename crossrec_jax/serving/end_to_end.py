"""Serving an end-to-end (``config.encoder_mode = "end_to_end"``) run: the two-tower BERT.

``EndToEndModel`` holds jitted, sharded encoders and scorers over the checkpoint's parameters.
Texts are encoded in fixed length buckets and batches; pairs are scored by the multi-task head
from the cached vectors; top-K takes the retrieval score of a domain's catalog block by block
(``ranking.streamed_top_k``). Every item is encoded from its text, so an item never seen in
training is scored like any other (its ID bucket is the unknown one).
"""

from __future__ import annotations

import collections
import tempfile
from typing import Iterator, Sequence

import jax
import numpy as np
from flax import nnx

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import config_defaults
from crossrec_jax import ranking, rundir, sharding, text_cache
from crossrec_jax.data import processing
from crossrec_jax.data.pipeline import stable_bucket
from crossrec_jax.errors import ScoringError
from crossrec_jax.models import CrossDomainRecommender, RecommenderConfig, hf
from crossrec_jax.training import steps

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


class EndToEndModel:
  """Jitted, sharded encoders and scorers over a restored end-to-end checkpoint."""

  def __init__(self, graphdef, params, model_config: RecommenderConfig, config, tokenizer, mesh,
               known_ids=None, batch_size: int = 256, step: int | None = None):
    self.graphdef, self.params, self.model_config = graphdef, params, model_config
    self.config, self.tokenizer, self.mesh, self.step = config, tokenizer, mesh, step
    n = mesh.devices.size
    self.batch_size = max(n, (batch_size // n) * n)   # divisible by the devices: no ragged shards
    self.known_users = None if known_ids is None else known_ids["users"]
    self.known_items = None if known_ids is None else known_ids["items"]
    self.domains = [d.name for d in model_config.domains]
    self.tasks = {d.name: d.task for d in model_config.domains}
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    encode_users, encode_items, _, project_items, project_users = steps.make_encode_fns(graphdef)
    self._encode = {"user": jax.jit(encode_users, in_shardings=(rep, data, data, data), out_shardings=rep),
                    "item": jax.jit(encode_items, in_shardings=(rep, data, data, data), out_shardings=rep)}
    self._project_users = jax.jit(project_users, out_shardings=rep)
    self._project_items = jax.jit(project_items, out_shardings=rep)

    def head(params, users, items, domain):
      out = nnx.merge(graphdef, params).head(users, items, domain)
      return {"rating": out["rating"], "probability": jax.nn.sigmoid(out["logit"]),
              "retrieval": out["retrieval"]}
    self._head = jax.jit(head, in_shardings=(rep, data, data, data), out_shardings=rep)
    # Top-K blocks: users split over the devices, the item block replicated to every device.
    self._block_scores = jax.jit(lambda users, items: users @ items.T,
                                 in_shardings=(data, rep), out_shardings=data)

  @classmethod
  def load(cls, workdir, ckpt_dir, meta: dict, *, step: int | None = None, batch_size: int = 256,
           devices=None) -> "EndToEndModel":
    """The parameters of ``step`` (None: the newest restorable one; a corrupt newest one is
    skipped with a warning naming both steps) and the run's tokenizer and known IDs."""
    try:
      model_config = RecommenderConfig.from_dict(meta["model"])
      config = config_defaults.saved_config(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
      raise ckpt_lib.CheckpointIncompatibleError(
          f"{ckpt_dir}: checkpoint description is not from this crossrec_jax version "
          f"({e}); re-export it with the version that trained it.") from e
    abstract = nnx.eval_shape(lambda: CrossDomainRecommender(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    logical = sharding.logical_axes_tree(abstract_params)
    params_shape = nnx.to_pure_dict(abstract_params)
    mesh = sharding.create_mesh({"data": -1}, devices)
    # Inference replicates the parameters (no rule maps anything to the data axis), and
    # reads only them: the optimizer state in the checkpoint stays on disk.
    param_shardings = sharding.tree_shardings(params_shape, logical, (), mesh)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      restored_step, params, _, _ = checkpointer.restore(
          ckpt_lib.abstract_like(params_shape, param_shardings),
          expected_meta={"model": meta["model"]}, max_step=step, params_only=True)
    finally:
      checkpointer.close()
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer = hf.load_tokenizer(rundir.local_copy(workdir / meta.get("tokenizer", "tokenizer"), tmp))
    return cls(graphdef, params, model_config, config, tokenizer, mesh,
               rundir.read_known_ids(workdir), batch_size, restored_step)

  # -- encoding ---------------------------------------------------------------------------------
  def _max_length(self, kind):
    return int(self.config.data.user_max_length if kind == "user" else self.config.data.item_max_length)

  def _buckets(self, kind, keys):
    n = self.model_config.user_buckets if kind == "user" else self.model_config.item_buckets
    known = self.known_users if kind == "user" else self.known_items
    if not n or known is None or keys is None:
      return np.full(len(keys) if keys is not None else 0, -1, np.int32)
    hashes = np.array([rundir.id_hash(k) for k in keys], np.int64)
    is_known = np.isin(hashes, known)
    return np.where(is_known, [stable_bucket(k, n) for k in keys], -1).astype(np.int32)

  def encode(self, kind: str, texts: Sequence[str], keys: Sequence[str] | None = None) -> np.ndarray:
    """Vectors for ``texts`` (users' profiles or items' texts), each encoded exactly once.

    Texts are grouped by token length into a few fixed bucket lengths and fixed-size batches
    (the last one padded), so the jitted encoder compiles once per bucket, never per batch.
    """
    max_len = self._max_length(kind)
    buckets = self._buckets(kind, keys) if keys is not None else np.full(len(texts), -1, np.int32)
    enc = self.tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]
    forward = lambda ids, mask, bucket: sharding.to_host(self._encode[kind](
        self.params, *sharding.global_from_full_batch(
            {"ids": ids, "mask": mask, "bucket": bucket}, self.mesh).values()))
    width = lambda n: min(next((b for b in LENGTH_BUCKETS if b >= n), max_len), max_len)
    return text_cache.encode_in_batches(forward, enc, self.model_config.dim, self.batch_size,
                                        width=width, one_width_per_batch=True,
                                        extra={"bucket": buckets})

  # -- scoring vectors --------------------------------------------------------------------------
  def score_pairs(self, users: np.ndarray, items: np.ndarray, domains: np.ndarray) -> dict[str, np.ndarray]:
    """Head outputs for aligned rows of user / item vectors and domain indices."""
    n, b = len(users), self.batch_size
    out = collections.defaultdict(list)
    for start in range(0, n, b):
      sl = slice(start, min(start + b, n))
      m = sl.stop - sl.start
      pad = lambda x: np.concatenate([x, np.repeat(x[-1:], b - m, axis=0)]) if m < b else x
      res = self._head(self.params, *sharding.global_from_full_batch(
          {"u": pad(users[sl]), "v": pad(items[sl]), "d": pad(domains[sl].astype(np.int32))},
          self.mesh).values())
      for k, v in res.items():
        out[k].append(sharding.to_host(v)[:m])
    return {k: np.concatenate(v) for k, v in out.items()}

  def top_k(self, users: np.ndarray, items: np.ndarray, domain: int, k: int,
            exclude: Sequence[Sequence[int]] | None = None, item_block: int = 4096
            ) -> tuple[np.ndarray, np.ndarray]:
    """Top-K items (row indices into ``items``, -1 past the candidates) by retrieval score for
    each user, through ``ranking.streamed_top_k``: the users x items matrix is never formed."""
    n_users = len(users)
    pad = (-n_users) % self.mesh.devices.size   # users split evenly over the devices
    users = np.concatenate([users, np.repeat(users[-1:], pad, axis=0)]) if pad else users
    exclude = list(exclude or ()) + [()] * (len(users) - len(exclude or ()))
    user_proj = sharding.global_from_full_batch(
        {"u": sharding.to_host(self._project_users(self.params, users))[:, domain]}, self.mesh)["u"]
    item_proj = sharding.to_host(self._project_items(self.params, items))[:, domain]
    width = -(-max((len(e) for e in exclude), default=1) // 8) * 8 or 8
    excl = np.full((len(users), width), -1, np.int32)
    for i, e in enumerate(exclude):
      excl[i, :len(e)] = list(e)
    scores, index = ranking.streamed_top_k(
        lambda lo, hi: self._block_scores(user_proj, item_proj[lo:hi]), len(items), excl,
        k=min(k, len(items)), block=item_block)
    return index[:n_users], scores[:n_users]

  # -- serving (serving.scorer.Scorer's engine) --------------------------------------------------
  def _profiles(self, people, persons, items):
    texts = []
    for u in persons:
      if not people.histories.get(u):
        raise ScoringError(f"user {u!r} has no history in the users file: a profile needs at "
                           "least one interaction (cold users: include their other-domain history)")
      texts.append(processing.user_profile(people.histories[u], items, self.tasks, people.processing))
    return texts

  def _encode_users(self, people, persons, items):
    return self.encode("user", self._profiles(people, persons, items),
                       [people.key(u) for u in persons])

  def _encode_items(self, keys, items):
    return self.encode("item", [items[k].text or f"{k[0]} item {k[1]}" for k in keys],
                       [f"{d}/{i}" for d, i in keys])

  def recommend(self, people, items, wanted, k: int, chunk_users: int, progress=None
                ) -> Iterator[dict]:
    """Top-``k`` items of each wanted domain per person (their own history left out)."""
    keys = sorted(items)
    vectors = self._encode_items(keys, items)
    catalogs = {}   # each domain's catalog rows, once (not per user chunk)
    for name in wanted:
      rows = np.array([n for n, key in enumerate(keys) if key[0] == name])
      if len(rows):
        catalogs[name] = (rows, {keys[r][1]: j for j, r in enumerate(rows)})
    persons = sorted(people.histories)
    for start in range(0, len(persons), chunk_users):
      chunk = persons[start:start + chunk_users]
      users = self._encode_users(people, chunk, items)
      columns = collections.defaultdict(list)
      for name, (rows, local) in catalogs.items():
        exclude = [[local[x.item_id] for x in people.histories[u]
                    if x.domain == name and x.item_id in local] for u in chunk]
        top, scores = self.top_k(users, vectors[rows], self.domains.index(name), k, exclude)
        for n, u in enumerate(chunk):
          for rank, (j, s) in enumerate(zip(top[n], scores[n])):
            if j < 0 or not np.isfinite(s):
              continue
            columns["user_id"].append(u)
            columns["domain"].append(name)
            columns["rank"].append(rank + 1)
            columns["item_id"].append(keys[rows[j]][1])
            columns["score"].append(float(s))
      yield dict(columns)
      if progress is not None:
        progress.update(len(chunk))

  def score(self, people, items, pairs, chunk_users: int, progress=None) -> Iterator[dict]:
    """Head outputs of (user_id, item_id, domain) pairs: the predicted rating on rating
    domains, the interaction probability on implicit ones, and the retrieval score."""
    keys = list(dict.fromkeys((d, i) for _, i, d in pairs))
    item_row = {key: n for n, key in enumerate(keys)}
    item_vecs = self._encode_items(keys, items)
    person = [people.of(d, u) for u, _, d in pairs]   # as training linked them
    persons = list(dict.fromkeys(person))
    for start in range(0, len(persons), chunk_users):
      chunk = persons[start:start + chunk_users]
      users = self._encode_users(people, chunk, items)
      row_of = {u: n for n, u in enumerate(chunk)}
      sel = [n for n, p in enumerate(person) if p in row_of]
      chosen = [pairs[n] for n in sel]
      out = self.score_pairs(users[[row_of[person[n]] for n in sel]],
                             item_vecs[[item_row[(d, i)] for _, i, d in chosen]],
                             np.array([self.domains.index(d) for _, _, d in chosen]))
      is_rating = np.array([self.tasks[d] == "rating" for _, _, d in chosen])
      yield {"user_id": [u for u, _, _ in chosen], "item_id": [i for _, i, _ in chosen],
             "domain": [d for _, _, d in chosen],
             "task": ["rating" if r else "implicit" for r in is_rating],
             "score": np.where(is_rating, out["rating"], out["probability"]).astype(np.float32),
             "retrieval_score": out["retrieval"].astype(np.float32)}
      if progress is not None:
        progress.update(len(chosen))
