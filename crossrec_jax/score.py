"""Batch inference from a training checkpoint: encode every distinct user and item once, then
score pairs or take the top-K of each domain's whole catalog, streaming results to disk.

python -m crossrec_jax.score --checkpoint runs/demo --users histories.csv --items items.csv \
    --output scores.parquet [--pairs pairs.csv] [--top_k 10] [--domains music,books]
"""

from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import optim, sharding, steps
from crossrec_jax.data import processing, records as records_lib
from crossrec_jax.data.pipeline import stable_bucket
from crossrec_jax.models import CrossDomainRecommender, RecommenderConfig, hf

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
KNOWN_IDS_FILE = "known_ids.npz"


class ScoringError(ValueError):
  """Bad scoring input (unknown item, empty file, missing column, ...)."""


def id_hash(key: str) -> int:
  return stable_bucket(key, 1 << 62)


def write_known_ids(workdir, user_keys: Sequence[str], item_keys: Sequence[str]) -> None:
  """Hashes of the user / item IDs seen in training (so scoring gives them their ID rows)."""
  np.savez(pathlib.Path(workdir) / KNOWN_IDS_FILE,
           users=np.unique(np.array([id_hash(k) for k in user_keys], np.int64)),
           items=np.unique(np.array([id_hash(k) for k in item_keys], np.int64)))


def _checkpoint_paths(path) -> tuple[pathlib.Path, pathlib.Path]:
  path = pathlib.Path(path).absolute()
  if (path / "checkpoints").is_dir():
    return path, path / "checkpoints"
  if path.name == "checkpoints" and path.is_dir():
    return path.parent, path
  raise ScoringError(f"{path}: not a training workdir (no checkpoints/ inside). Pass the --workdir "
                     "of a crossrec_jax.train run.")


class Scorer:
  """Jitted, sharded encoders and scorers over a restored checkpoint."""

  def __init__(self, graphdef, params, model_config: RecommenderConfig, config, tokenizer, mesh,
               known_ids=None, batch_size: int = 256):
    self.graphdef, self.params, self.model_config = graphdef, params, model_config
    self.config, self.tokenizer, self.mesh = config, tokenizer, mesh
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
                      devices=None) -> "Scorer":
    workdir, ckpt_dir = _checkpoint_paths(path)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      available = checkpointer.all_steps()
      if not available:
        raise ScoringError(f"{ckpt_dir}: no checkpoint inside")
      step = available[-1] if step is None else step
      if step not in available:
        raise ScoringError(f"{ckpt_dir}: no step {step}; available: {available}")
      meta = checkpointer.read_meta(step)
      if (meta.get("model") or {}).get("stage") == "cached":
        raise ScoringError(
            f"{ckpt_dir / str(step)}: a stage-1 (config.stage='cached') checkpoint; this scorer "
            "serves end-to-end checkpoints only. Evaluate a stage-1 run by running the same "
            "train command again (it restores and evaluates), or train with "
            "--config.stage=end_to_end to score with this CLI.")
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
      tx = optim.create_optimizer(config, params_shape)
      abstract_state = jax.eval_shape(lambda p: steps.TrainState(
          jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0)), params_shape)
      mesh = sharding.create_mesh({"data": -1}, devices)
      # Inference replicates the parameters (no rule maps anything to the data axis).
      shardings_ = steps.state_shardings(abstract_state, logical, tx, (), mesh)
      restored = checkpointer.restore(ckpt_lib.abstract_like(abstract_state, shardings_),
                                      expected_meta={"model": meta["model"]})
    finally:
      checkpointer.close()
    _, state, _, _ = restored
    tokenizer = hf.load_tokenizer(workdir / meta.get("tokenizer", "tokenizer"))
    known = workdir / KNOWN_IDS_FILE
    known_ids = dict(np.load(known)) if known.exists() else None
    return cls(graphdef, state.params, model_config, config, tokenizer, mesh, known_ids, batch_size)

  # -- encoding ---------------------------------------------------------------------------------
  def _max_length(self, kind):
    return int(self.config.data.user_max_length if kind == "user" else self.config.data.item_max_length)

  def _buckets(self, kind, keys):
    n = self.model_config.user_buckets if kind == "user" else self.model_config.item_buckets
    known = self.known_users if kind == "user" else self.known_items
    if not n or known is None or keys is None:
      return np.full(len(keys) if keys is not None else 0, -1, np.int32)
    hashes = np.array([id_hash(k) for k in keys], np.int64)
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


# -- files ------------------------------------------------------------------------------------------

class _AtomicTableWriter:
  """Writes Parquet (or CSV) chunk by chunk to ``<output>.partial`` and renames on close."""

  def __init__(self, output: pathlib.Path, fmt: str):
    self.output, self.fmt = output, fmt
    self.partial = output.with_name(output.name + ".partial")
    self.writer, self.rows = None, 0

  def write(self, columns: dict[str, Any]):
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.csv as pacsv  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    table = pa.table(columns)
    if self.writer is None:
      self.writer = (pq.ParquetWriter(self.partial, table.schema) if self.fmt == "parquet"
                     else pacsv.CSVWriter(self.partial, table.schema))
    self.writer.write_table(table)
    self.rows += table.num_rows

  def commit(self):
    if self.writer is None:
      raise ScoringError("nothing to write: no rows were scored")
    self.writer.close()
    os.replace(self.partial, self.output)

  def abort(self):
    if self.writer is not None:
      self.writer.close()
    self.partial.unlink(missing_ok=True)


def _read_inputs(users_path, items_path, scorer: Scorer):
  tasks = {d.name: d.task for d in scorer.model_config.domains}
  items = records_lib.read_items(pathlib.Path(items_path))
  unknown = sorted({d for d, _ in items} - set(tasks))
  if unknown:
    raise ScoringError(f"{items_path}: domain(s) {unknown} are not domains of this model "
                       f"({sorted(tasks)})")
  history = records_lib.read_interactions(pathlib.Path(users_path))
  history = records_lib.check_against_items(history, items, items_path)
  d = scorer.config.data
  processing_config = processing.ProcessingConfig(
      link_secret=d.link_secret, max_profile_items=d.max_profile_items,
      max_items_per_domain=d.max_items_per_domain, max_profile_words=d.max_profile_words)
  by_user = collections.defaultdict(list)
  for x in history:
    by_user[x.user_id].append(x)
  return items, by_user, tasks, processing_config


def _progress(total, desc):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)


def run_scoring(checkpoint, users, items, output, *, pairs=None, top_k=0, domains=None,
                output_format=None, chunk_users=4096, batch_size=256) -> dict[str, Any]:
  """The CLI's work, as a function. Returns counts; the output appears only when complete."""
  output = pathlib.Path(output)
  fmt = output_format or ("csv" if output.suffix == ".csv" else "parquet")
  if not pairs and not top_k:
    raise ScoringError("pass --pairs FILE (pairs mode) or --top_k K (top-K mode)")
  scorer = Scorer.from_checkpoint(checkpoint, batch_size=batch_size)
  item_table, by_user, tasks, pconfig = _read_inputs(users, items, scorer)
  wanted = list(domains) if domains else [d.name for d in scorer.model_config.domains]
  for name in wanted:
    if name not in tasks:
      raise ScoringError(f"--domains: unknown domain {name!r}; this model has {sorted(tasks)}")
  index = {d.name: i for i, d in enumerate(scorer.model_config.domains)}
  user_key = lambda u: processing.link_key(pconfig.link_secret, u)

  item_keys = sorted(item_table)
  item_vecs = scorer.encode("item", [item_table[k].text or f"{k[0]} item {k[1]}" for k in item_keys],
                            [f"{d}/{i}" for d, i in item_keys])
  item_row = {k: n for n, k in enumerate(item_keys)}
  writer = _AtomicTableWriter(output, fmt)
  try:
    if pairs:
      counts = _score_pairs_file(scorer, pairs, by_user, item_table, item_row, item_vecs, tasks,
                                 index, pconfig, user_key, writer, chunk_users, wanted)
    else:
      counts = _score_top_k(scorer, by_user, item_table, item_keys, item_vecs, tasks, index,
                            pconfig, user_key, writer, chunk_users, wanted, top_k)
    writer.commit()
  except BaseException:
    writer.abort()  # never leave a partial file that looks complete
    raise
  return counts | {"output": str(output), "rows": writer.rows}


def _profiles(user_ids, by_user, item_table, tasks, pconfig):
  texts = []
  for u in user_ids:
    if not by_user.get(u):
      raise ScoringError(f"user {u!r} has no history in the users file: a profile needs at least "
                         "one interaction (cold users: include their other-domain history)")
    texts.append(processing.user_profile(by_user[u], item_table, tasks, pconfig))
  return texts


def _score_pairs_file(scorer, pairs_path, by_user, item_table, item_row, item_vecs, tasks, index,
                      pconfig, user_key, writer, chunk_users, wanted):
  names, rows = records_lib.iter_rows(pathlib.Path(pairs_path))
  missing = [c for c in ("user_id", "item_id", "domain") if c not in names]
  if missing:
    raise ScoringError(f"{pairs_path}: missing column(s) {missing}; pairs need user_id,item_id,domain")
  pairs = []
  for place, row in rows:
    u, i, d = (str(row.get(c) or "").strip() for c in ("user_id", "item_id", "domain"))
    if d not in tasks:
      raise ScoringError(f"{place}: field domain {d!r} is not a domain of this model ({sorted(tasks)})")
    if (d, i) not in item_row:
      raise ScoringError(f"{place}: field item_id {i!r} of domain {d!r} is not in the items file")
    if d in wanted:
      pairs.append((u, i, d))
  if not pairs:
    raise ScoringError(f"{pairs_path}: no pairs to score")
  users = list(dict.fromkeys(u for u, _, _ in pairs))
  progress = _progress(len(pairs), "pairs")
  for start in range(0, len(users), chunk_users):
    chunk = users[start:start + chunk_users]
    vecs = scorer.encode("user", _profiles(chunk, by_user, item_table, tasks, pconfig),
                         [user_key(u) for u in chunk])
    row_of = {u: n for n, u in enumerate(chunk)}
    sel = [p for p in pairs if p[0] in row_of]
    out = scorer.score_pairs(vecs[[row_of[u] for u, _, _ in sel]],
                             item_vecs[[item_row[(d, i)] for _, i, d in sel]],
                             np.array([index[d] for _, _, d in sel]))
    is_rating = np.array([tasks[d] == "rating" for _, _, d in sel])
    writer.write({"user_id": [u for u, _, _ in sel], "item_id": [i for _, i, _ in sel],
                  "domain": [d for _, _, d in sel], "task": ["rating" if r else "implicit" for r in is_rating],
                  "score": np.where(is_rating, out["rating"], out["probability"]).astype(np.float32),
                  "retrieval_score": out["retrieval"].astype(np.float32)})
    progress.update(len(sel))
  progress.close()
  return {"pairs": len(pairs), "users": len(users), "items": len(item_vecs)}


def _score_top_k(scorer, by_user, item_table, item_keys, item_vecs, tasks, index, pconfig,
                 user_key, writer, chunk_users, wanted, k):
  users = sorted(by_user)
  if not users:
    raise ScoringError("the users file has no user")
  # Each domain's catalog rows, once (not per user chunk).
  catalogs = {}
  for name in wanted:
    rows = np.array([n for n, key in enumerate(item_keys) if key[0] == name])
    if len(rows):
      catalogs[name] = (rows, {item_keys[r][1]: j for j, r in enumerate(rows)})
  progress = _progress(len(users), "users")
  for start in range(0, len(users), chunk_users):
    chunk = users[start:start + chunk_users]
    vecs = scorer.encode("user", _profiles(chunk, by_user, item_table, tasks, pconfig),
                         [user_key(u) for u in chunk])
    columns = collections.defaultdict(list)
    for name, (rows, local) in catalogs.items():
      exclude = [[local[x.item_id] for x in by_user[u] if x.domain == name and x.item_id in local]
                 for u in chunk]
      top, scores = scorer.top_k(vecs, item_vecs[rows], index[name], k, exclude)
      for n, u in enumerate(chunk):
        for rank, (j, s) in enumerate(zip(top[n], scores[n])):
          if j < 0 or not np.isfinite(s):
            continue
          columns["user_id"].append(u)
          columns["domain"].append(name)
          columns["rank"].append(rank + 1)
          columns["item_id"].append(item_keys[rows[j]][1])
          columns["score"].append(float(s))
    writer.write({k_: v for k_, v in columns.items()})
    progress.update(len(chunk))
  progress.close()
  return {"users": len(users), "items": len(item_vecs)}


def main(argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  counts = run_scoring(f.checkpoint, f.users, f.items, f.output, pairs=f.pairs, top_k=f.top_k,
                       domains=f.domains, output_format=f.format, batch_size=f.batch_size)
  print(json.dumps(counts))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ folder).")
  flags.DEFINE_string("users", None, "User histories: interactions layout (CSV/JSONL/Parquet).")
  flags.DEFINE_string("items", None, "Items with text: items layout (CSV/JSONL/Parquet).")
  flags.DEFINE_string("output", None, "Output file (.parquet, or .csv).")
  flags.DEFINE_string("pairs", None, "Optional user_id,item_id,domain pairs to score.")
  flags.DEFINE_integer("top_k", 0, "Top-K items per user and domain (when no --pairs).")
  flags.DEFINE_list("domains", None, "Domains to score (default: all).")
  flags.DEFINE_enum("format", None, ["parquet", "csv"], "Output format (default: by suffix).")
  flags.DEFINE_integer("batch_size", 256, "Encoder batch size (a multiple of the device count).")
  flags.mark_flags_as_required(["checkpoint", "users", "items", "output"])
  app.run(main)
