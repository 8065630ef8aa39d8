"""``Scorer``: jitted, sharded encoders and scorers over an end-to-end training checkpoint.
Encodes texts in fixed length buckets and batches, scores aligned user / item pairs, and takes
the top-K of a catalog block by block. The command line around it is crossrec_jax/score.py.
"""

from __future__ import annotations

import collections
import functools
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import rundir, sharding
from crossrec_jax.training import steps
from crossrec_jax.errors import ScoringError
from crossrec_jax.data.pipeline import stable_bucket
from crossrec_jax.models import CrossDomainRecommender, RecommenderConfig, hf

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


class Scorer:
  """Jitted, sharded encoders and scorers over a restored checkpoint."""

  def __init__(self, graphdef, params, model_config: RecommenderConfig, config, tokenizer, mesh,
               known_ids=None, batch_size: int = 256):
    self.graphdef, self.params, self.model_config = graphdef, params, model_config
    self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
    self.step = self.checkpoint_dir = self.link_secret = None  # set by from_checkpoint
    n = mesh.devices.size
    self.batch_size = max(n, (batch_size // n) * n)   # divisible by the devices: no ragged shards
    self.known_users = None if known_ids is None else known_ids["users"]
    self.known_items = None if known_ids is None else known_ids["items"]
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
    # Users are split over the devices; the item block is replicated to every device.
    self._topk_block = functools.lru_cache(maxsize=None)(lambda k: jax.jit(
        functools.partial(_topk_block, k=k), in_shardings=(data, rep, rep, data, rep, data, data),
        out_shardings=(data, data)))

  # -- construction -----------------------------------------------------------------------------
  @classmethod
  def from_checkpoint(cls, path, *, step: int | None = None, batch_size: int = 256,
                      devices=None, secret_file: str = "") -> "Scorer":
    """``step`` None: the newest restorable step (a corrupt newest one is skipped with a
    warning naming both steps); ``scorer.step`` says which step was restored."""
    workdir, ckpt_dir = rundir.checkpoint_paths(path)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      available = checkpointer.all_steps()
      if not available:
        raise ScoringError(f"{ckpt_dir}: no checkpoint inside")
      if step is not None and step not in available:
        raise ScoringError(f"{ckpt_dir}: no step {step}; available: {available}")
      meta = rundir.newest_meta(checkpointer, [step] if step is not None else available)
      if (meta.get("model") or {}).get("encoder_mode") == "frozen":
        raise ScoringError(
            f"{ckpt_dir / str(step)}: a frozen-mode (config.encoder_mode='frozen') checkpoint; Scorer "
            "serves end-to-end checkpoints only. Score it with `python -m crossrec_jax.score` "
            "or score.run_scoring (which serve frozen-mode runs through crossrec_jax.serving.hybrid), "
            "or load it with crossrec_jax.served.load.")
      try:
        model_config = RecommenderConfig.from_dict(meta["model"])
        config = ml_collections.ConfigDict(meta["config"])
      except (KeyError, TypeError, ValueError) as e:
        raise ckpt_lib.CheckpointIncompatibleError(
            f"{ckpt_dir / str(step)}: checkpoint description is not from this crossrec_jax version "
            f"({e}); re-export it with the version that trained it.") from e
      abstract = nnx.eval_shape(lambda: CrossDomainRecommender(model_config, rngs=nnx.Rngs(0)))
      graphdef, abstract_params = nnx.split(abstract, nnx.Param)
      logical = sharding.logical_axes_tree(abstract_params)
      params_shape = nnx.to_pure_dict(abstract_params)
      mesh = sharding.create_mesh({"data": -1}, devices)
      # Inference replicates the parameters (no rule maps anything to the data axis), and
      # reads only them: the optimizer state in the checkpoint stays on disk.
      param_shardings = sharding.tree_shardings(params_shape, logical, (), mesh)
      restored = checkpointer.restore(ckpt_lib.abstract_like(params_shape, param_shardings),
                                      expected_meta={"model": meta["model"]}, max_step=step,
                                      params_only=True)
    finally:
      checkpointer.close()
    restored_step, params, _, _ = restored
    secret = rundir.scoring_secret(meta, secret_file)
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer = hf.load_tokenizer(rundir.local_copy(workdir / meta.get("tokenizer", "tokenizer"), tmp))
    known_ids = rundir.read_known_ids(workdir)
    scorer = cls(graphdef, params, model_config, config, tokenizer, mesh, known_ids,
                 batch_size)
    scorer.step, scorer.checkpoint_dir, scorer.link_secret = restored_step, ckpt_dir, secret
    return scorer

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
    lengths = np.array([len(x) for x in enc])
    bucket_len = np.array([next((b for b in LENGTH_BUCKETS if b >= l), max_len) for l in lengths])
    bucket_len = np.minimum(bucket_len, max_len)
    out = np.zeros((len(texts), self.model_config.dim), np.float32)
    for length in np.unique(bucket_len):
      idx = np.flatnonzero(bucket_len == length)
      for start in range(0, len(idx), self.batch_size):
        chunk = idx[start:start + self.batch_size]
        ids = np.zeros((self.batch_size, length), np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for row, i in enumerate(chunk):
          ids[row, :lengths[i]] = enc[i]
          mask[row, :lengths[i]] = 1
        ids[len(chunk):] = ids[0]   # padding rows: copies, results dropped
        mask[len(chunk):] = mask[0]
        b = np.full(self.batch_size, -1, np.int32)
        b[:len(chunk)] = buckets[chunk]
        vec = self._encode[kind](self.params, *sharding.global_from_full_batch(
            {"ids": ids, "mask": mask, "bucket": b}, self.mesh).values())
        out[chunk] = sharding.to_host(vec)[:len(chunk)]
    return out

  # -- scoring ----------------------------------------------------------------------------------
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
    """Top-K items (row indices into ``items``) by retrieval score for each user.

    The catalog is scanned in fixed-size blocks; each block's scores are masked (padding,
    excluded items) and reduced with ``lax.top_k``, then merged with the running top-K: the
    users x items matrix is never materialised.
    """
    k = min(k, len(items))
    n_users = len(users)
    pad = (-n_users) % self.mesh.devices.size
    users = np.concatenate([users, np.repeat(users[-1:], pad, axis=0)]) if pad else users
    exclude = list(exclude or [()] * n_users) + [()] * pad
    user_proj = sharding.to_host(self._project_users(self.params, users))[:, domain]
    item_proj = sharding.to_host(self._project_items(self.params, items))[:, domain]
    block = min(item_block, max(len(items), 1))
    max_excl = max((len(e) for e in exclude), default=0) if exclude else 0
    excl = np.full((len(users), max(max_excl, 1)), -1, np.int32)
    for i, e in enumerate(exclude or ()):
      excl[i, :len(e)] = list(e)
    best_scores = np.full((len(users), k), -np.inf, np.float32)  # merged across blocks
    best_index = np.full((len(users), k), -1, np.int32)
    for start in range(0, len(items), block):
      part = item_proj[start:start + block]
      valid = np.zeros(block, bool)
      valid[:len(part)] = True
      if len(part) < block:
        part = np.concatenate([part, np.zeros((block - len(part), part.shape[1]), part.dtype)])
      s, i = self._topk_block(k)(user_proj, part, valid, excl, np.int32(start), best_scores,
                                 best_index)
      best_scores, best_index = s, i   # stay on device between blocks
    return sharding.to_host(best_index)[:n_users], sharding.to_host(best_scores)[:n_users]


def _topk_block(user_proj, item_block, valid, exclude, offset, best_scores, best_index, *, k):
  block = item_block.shape[0]
  scores = user_proj @ item_block.T                                   # [U, block]
  scores = jnp.where(valid[None, :], scores, -jnp.inf)
  # Excluded items (e.g. the user's history) -> -inf; indices outside this block are dropped.
  cols = exclude - offset
  cols = jnp.where((exclude >= 0) & (cols >= 0) & (cols < block), cols, block)
  rows = jnp.arange(scores.shape[0])[:, None]
  scores = scores.at[rows, cols].set(-jnp.inf, mode="drop")
  index = offset + jnp.arange(block, dtype=jnp.int32)
  s, i = jax.lax.top_k(scores, min(k, item_block.shape[0]))
  merged_scores = jnp.concatenate([best_scores, s], axis=1)
  merged_index = jnp.concatenate([best_index, index[i]], axis=1)
  top, pos = jax.lax.top_k(merged_scores, k)
  return top, jnp.take_along_axis(merged_index, pos, axis=1)
