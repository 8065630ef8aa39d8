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
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import optim, sharding, steps
from crossrec_jax.data import link_secret, processing, records as records_lib
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
  with (epath.Path(workdir) / KNOWN_IDS_FILE).open("wb") as f:
    np.savez(f, users=np.unique(np.array([id_hash(k) for k in user_keys], np.int64)),
             items=np.unique(np.array([id_hash(k) for k in item_keys], np.int64)))


def _checkpoint_paths(path) -> tuple[epath.Path, epath.Path]:
  path = epath.Path(path)  # gs://bucket/run stays intact
  if "://" not in str(path):
    path = path.absolute()
  if not path.exists():
    raise ScoringError(f"--checkpoint {path} does not exist (mistyped?); pass the --workdir of a "
                       "crossrec_jax.train run")
  if (path / "checkpoints").is_dir():
    return path, path / "checkpoints"
  if path.name == "checkpoints" and path.is_dir():
    return path.parent, path
  raise ScoringError(f"--checkpoint {path}: not a training workdir (no checkpoints/ inside). Pass "
                     "the --workdir of a crossrec_jax.train run.")


def _local_copy(directory: epath.Path, into: str) -> str:
  """A local path for ``directory`` (a bucket folder is copied: tokenizers load from disk)."""
  if "://" not in str(directory):
    return str(directory)
  for f in directory.iterdir():
    f.copy(epath.Path(into) / f.name)
  return into


def scoring_secret(meta: dict, secret_file: str = "") -> link_secret.LinkSecret:
  """The linkage secret the checkpoint's users were keyed with (checked by its digest).

  Looked up in: ``secret_file``, ``CROSSREC_LINK_SECRET``, ``CROSSREC_LINK_SECRET_FILE``, the
  secret file recorded at training time, and the public demo secret (synthetic data).
  """
  described = meta.get("link_secret") or {}
  wanted = described.get("digest")
  legacy = ((meta.get("config") or {}).get("data") or {}).get("link_secret")
  if not wanted:  # checkpoints written before secrets were redacted stored the value itself
    return link_secret.LinkSecret(legacy or link_secret.DEMO_SECRET, "checkpoint config (older run)")
  candidates, tried = [], []
  if secret_file:
    candidates.append(lambda: link_secret.read_secret_file(secret_file, "--link_secret_file"))
  if os.environ.get(link_secret.ENV_SECRET):
    candidates.append(lambda: link_secret.LinkSecret(os.environ[link_secret.ENV_SECRET],
                                                     f"environment {link_secret.ENV_SECRET}"))
  if os.environ.get(link_secret.ENV_SECRET_FILE):
    candidates.append(lambda: link_secret.read_secret_file(
        os.environ[link_secret.ENV_SECRET_FILE], link_secret.ENV_SECRET_FILE))
  if described.get("file") and pathlib.Path(described["file"]).is_file():
    candidates.append(lambda: link_secret.read_secret_file(described["file"], "secret file"))
  candidates.append(lambda: link_secret.LinkSecret(link_secret.DEMO_SECRET, "demo"))
  for make in candidates:
    secret = make()
    if secret.digest == wanted:
      return secret
    if secret.origin != "demo":
      tried.append(secret.origin)
  raise ScoringError(
      f"this model keyed its users with a linkage secret (digest {wanted}, from "
      f"{described.get('origin', '?')}) that "
      + (f"does not match {', '.join(tried)}" if tried else "was not found")
      + f"; set {link_secret.ENV_SECRET} or pass --link_secret_file with the training secret")


def _newest_meta(checkpointer, candidates) -> dict:
  """The description of the newest step whose metadata reads (corrupt steps are skipped by
  the restore that follows, which warns naming both steps)."""
  errors = []
  for step in sorted(candidates, reverse=True):
    try:
      return checkpointer.read_meta(step)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"step {step}: {type(e).__name__}")
  raise ckpt_lib.CheckpointIncompatibleError(
      f"{checkpointer.directory}: no checkpoint has a readable crossrec_jax description "
      f"({'; '.join(errors)}): a workdir of another program or model, or all steps are corrupt")


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
    workdir, ckpt_dir = _checkpoint_paths(path)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
    try:
      available = checkpointer.all_steps()
      if not available:
        raise ScoringError(f"{ckpt_dir}: no checkpoint inside")
      if step is not None and step not in available:
        raise ScoringError(f"{ckpt_dir}: no step {step}; available: {available}")
      meta = _newest_meta(checkpointer, [step] if step is not None else available)
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
                                      expected_meta={"model": meta["model"]}, max_step=step)
    finally:
      checkpointer.close()
    restored_step, state, _, _ = restored
    secret = scoring_secret(meta, secret_file)
    with tempfile.TemporaryDirectory() as tmp:
      tokenizer = hf.load_tokenizer(_local_copy(workdir / meta.get("tokenizer", "tokenizer"), tmp))
    known = workdir / KNOWN_IDS_FILE
    known_ids = None
    if known.exists():
      with known.open("rb") as f:
        known_ids = dict(np.load(f))
    scorer = cls(graphdef, state.params, model_config, config, tokenizer, mesh, known_ids,
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


def _read_inputs(users_path, items_path, scorer: Scorer, mapping_file: str | None = None):
  """Items, histories grouped by person (as training linked them), tasks, processing config and
  ``person_of(domain, user_id)``."""
  from crossrec_jax.data.from_config import processing_config  # pylint: disable=import-outside-toplevel
  tasks = {d.name: d.task for d in scorer.model_config.domains}
  items = records_lib.read_items(pathlib.Path(items_path))
  unknown = sorted({d for d, _ in items} - set(tasks))
  if unknown:
    raise ScoringError(f"{items_path}: domain(s) {unknown} are not domains of this model "
                       f"({sorted(tasks)})")
  history = records_lib.read_interactions(pathlib.Path(users_path))
  history = records_lib.check_against_items(history, items, items_path)
  config = scorer.config
  if mapping_file is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.mapping_file = mapping_file
  if config.data.get("mapping_file") and not pathlib.Path(config.data.mapping_file).is_file():
    raise ScoringError(f"the model was trained with data.mapping_file={config.data.mapping_file}, "
                       "which does not exist here; pass --mapping_file with that mapping")
  secret = scorer.link_secret or link_secret.LinkSecret(
      config.data.get("link_secret") or link_secret.DEMO_SECRET, "config")
  # The same conversion training used: same profile caps, same linkage (secret + mapping).
  pconfig = processing_config(config, secret)
  mapping = processing.read_mapping(pconfig.mapping_file) if pconfig.mapping_file else {}
  person_of = lambda domain, user: mapping.get((domain, user), user)
  by_person = collections.defaultdict(list)
  for x in history:
    by_person[person_of(x.domain, x.user_id)].append(x)
  return items, by_person, tasks, pconfig, person_of


def _progress(total, desc):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True)


OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv"}


def check_output(output, output_format=None, overwrite=False) -> tuple[pathlib.Path, str]:
  """The output path and format, refused before any work if it cannot be written as asked."""
  output = pathlib.Path(output)
  fmt = OUTPUT_FORMATS.get(output.suffix.lower())
  if fmt is None:
    raise ScoringError(f"--output {output}: unknown suffix {output.suffix or '(none)'!r}; name "
                       f"it .parquet or .csv (the format follows the suffix)")
  if output_format and output_format != fmt:
    raise ScoringError(f"--format {output_format} does not match --output {output} ({fmt}); "
                       "drop --format or change the suffix")
  if output.is_dir():
    raise ScoringError(f"--output {output} is a directory; pass a file name")
  if output.exists() and not overwrite:
    raise ScoringError(f"--output {output} already exists; pass --overwrite to replace it, or "
                       "choose another file")
  if not output.absolute().parent.is_dir():
    raise ScoringError(f"--output {output}: directory {output.absolute().parent} does not exist; "
                       "create it first")
  return output, fmt


def run_scoring(checkpoint, users, items, output, *, pairs=None, top_k=0, domains=None,
                output_format=None, chunk_users=4096, batch_size=256, overwrite=False,
                mapping_file=None, secret_file="", step=None) -> dict[str, Any]:
  """The CLI's work, as a function. Returns counts; the output appears only when complete."""
  if top_k < 0:
    raise ScoringError(f"--top_k {top_k} must be positive (items per user and domain)")
  if pairs and top_k:
    raise ScoringError("pass either --pairs FILE (pairs mode) or --top_k K (top-K mode), not both")
  if not pairs and not top_k:
    raise ScoringError("pass --pairs FILE (pairs mode) or --top_k K (top-K mode)")
  for flag, path in (("--users", users), ("--items", items), ("--pairs", pairs)):
    if path and not pathlib.Path(path).is_file():
      raise ScoringError(f"{flag} {path}: no such file")
  if batch_size <= 0 or chunk_users <= 0:
    raise ScoringError(f"--batch_size {batch_size} must be positive")
  output, fmt = check_output(output, output_format, overwrite)
  if _is_stage1(checkpoint, step):
    return _run_stage1(checkpoint, users, items, output, fmt, pairs=pairs, top_k=top_k,
                       domains=domains, mapping_file=mapping_file, secret_file=secret_file)
  scorer = Scorer.from_checkpoint(checkpoint, batch_size=batch_size, secret_file=secret_file,
                                  step=step)
  print(f"Scoring with checkpoint step {scorer.step} of {scorer.checkpoint_dir}", file=sys.stderr,
        flush=True)
  item_table, by_user, tasks, pconfig, person_of = _read_inputs(users, items, scorer, mapping_file)
  wanted = list(domains) if domains else [d.name for d in scorer.model_config.domains]
  for name in wanted:
    if name not in tasks:
      raise ScoringError(f"--domains: unknown domain {name!r}; this model has {sorted(tasks)}")
  index = {d.name: i for i, d in enumerate(scorer.model_config.domains)}
  user_key = lambda person: processing.link_key(pconfig.link_secret, person)

  item_keys = sorted(item_table)
  item_vecs = scorer.encode("item", [item_table[k].text or f"{k[0]} item {k[1]}" for k in item_keys],
                            [f"{d}/{i}" for d, i in item_keys])
  item_row = {k: n for n, k in enumerate(item_keys)}
  writer = _AtomicTableWriter(output, fmt)
  try:
    if pairs:
      counts = _score_pairs_file(scorer, pairs, by_user, item_table, item_row, item_vecs, tasks,
                                 index, pconfig, user_key, writer, chunk_users, wanted, person_of)
    else:
      counts = _score_top_k(scorer, by_user, item_table, item_keys, item_vecs, tasks, index,
                            pconfig, user_key, writer, chunk_users, wanted, top_k)
    writer.commit()
  except BaseException:
    writer.abort()  # never leave a partial file that looks complete
    raise
  return counts | {"output": str(output), "rows": writer.rows, "step": scorer.step}


def _is_stage1(checkpoint, step=None) -> bool:
  _, ckpt_dir = _checkpoint_paths(checkpoint)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    available = checkpointer.all_steps()
    if not available or (step is not None and step not in available):
      return False  # Scorer.from_checkpoint says what is wrong
    meta = _newest_meta(checkpointer, [step] if step is not None else available)
  finally:
    checkpointer.close()
  return (meta.get("model") or {}).get("stage") == "cached"


def _run_stage1(checkpoint, users, items, output, fmt, *, pairs, top_k, domains, mapping_file,
                secret_file) -> dict[str, Any]:
  """A stage-1 run: its fused model (network + item-item CF), as its evaluation served it."""
  from crossrec_jax import stage1_run, stage1_score  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data.from_config import processing_config  # pylint: disable=import-outside-toplevel
  workdir, ckpt_dir = _checkpoint_paths(checkpoint)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    meta = _newest_meta(checkpointer, checkpointer.all_steps())
  finally:
    checkpointer.close()
  config = ml_collections.ConfigDict(meta["config"])
  if mapping_file is not None:
    config.data.mapping_file = mapping_file
  secret = scoring_secret(meta, secret_file)
  model, data, step = stage1_run.load(workdir, config, secret)
  print(f"Scoring with the stage-1 model of checkpoint step {step} of {ckpt_dir}", file=sys.stderr,
        flush=True)
  wanted = list(domains) if domains else data.names
  for name in wanted:
    if name not in data.names:
      raise ScoringError(f"--domains: unknown domain {name!r}; this model has {data.names}")
  item_table = records_lib.read_items(pathlib.Path(items))
  history = records_lib.check_against_items(records_lib.read_interactions(pathlib.Path(users)),
                                            item_table, items)
  by_person, user_key, person_of = stage1_score.linked_histories(
      history, processing_config(config, secret))
  writer = _AtomicTableWriter(output, fmt)
  progress = _progress(None if pairs else len(by_person), "pairs" if pairs else "users")
  try:
    if pairs:
      counts = stage1_score.score_pairs(model, data, by_person, user_key, item_table,
                                        pathlib.Path(pairs), person_of, wanted, writer.write,
                                        items_path=items, progress=progress)
    else:
      counts = stage1_score.score_top_k(model, data, by_person, user_key, item_table, wanted, top_k,
                                        writer.write, items_path=items, progress=progress)
    writer.commit()
  except stage1_score.Stage1ScoringError as e:
    writer.abort()
    raise ScoringError(str(e)) from e
  except BaseException:
    writer.abort()  # never leave a partial file that looks complete
    raise
  finally:
    progress.close()
  return counts | {"output": str(output), "rows": writer.rows, "step": step}


def _profiles(user_ids, by_user, item_table, tasks, pconfig):
  texts = []
  for u in user_ids:
    if not by_user.get(u):
      raise ScoringError(f"user {u!r} has no history in the users file: a profile needs at least "
                         "one interaction (cold users: include their other-domain history)")
    texts.append(processing.user_profile(by_user[u], item_table, tasks, pconfig))
  return texts


def _score_pairs_file(scorer, pairs_path, by_user, item_table, item_row, item_vecs, tasks, index,
                      pconfig, user_key, writer, chunk_users, wanted, person_of):
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
  # A pair's user is the person its (domain, user_id) maps to, as in training.
  person = {(u, d): person_of(d, u) for u, _, d in pairs}
  users = list(dict.fromkeys(person.values()))
  progress = _progress(len(pairs), "pairs")
  for start in range(0, len(users), chunk_users):
    chunk = users[start:start + chunk_users]
    vecs = scorer.encode("user", _profiles(chunk, by_user, item_table, tasks, pconfig),
                         [user_key(u) for u in chunk])
    row_of = {u: n for n, u in enumerate(chunk)}
    sel = [p for p in pairs if person[(p[0], p[2])] in row_of]
    out = scorer.score_pairs(vecs[[row_of[person[(u, d)]] for u, _, d in sel]],
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


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "Training workdir (or its checkpoints/ folder).", **d)
  flags.DEFINE_string("users", None, "User histories: interactions layout (CSV/JSONL/Parquet).", **d)
  flags.DEFINE_string("items", None, "Items with text: items layout (CSV/JSONL/Parquet).", **d)
  flags.DEFINE_string("output", None, "Output file (.parquet or .csv).", **d)
  flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.", **d)
  flags.DEFINE_string("pairs", None, "Optional user_id,item_id,domain pairs to score.", **d)
  flags.DEFINE_integer("top_k", 0, "Top-K items per user and domain (when no --pairs).", **d)
  flags.DEFINE_list("domains", None, "Domains to score (default: all).", **d)
  flags.DEFINE_enum("format", None, ["parquet", "csv"], "Output format (default: by suffix).", **d)
  flags.DEFINE_integer("batch_size", 256, "Encoder batch size (a multiple of the device count).", **d)
  flags.DEFINE_integer("step", None, "Checkpoint step to score (default: the newest).", **d)
  flags.DEFINE_string("mapping_file", None, "The domain,user_id,person_id mapping the model was "
                      "trained with, if it is elsewhere than the path in its config.", **d)
  flags.DEFINE_string("link_secret_file", "", "File holding the user-linkage secret of training "
                      "(or set CROSSREC_LINK_SECRET).", **d)
  flags.mark_flags_as_required(["checkpoint", "users", "items", "output"], flag_values=fv)


def _main(f) -> int:
  counts = run_scoring(f.checkpoint, f.users, f.items, f.output, pairs=f.pairs, top_k=f.top_k,
                       domains=f.domains, output_format=f.format, batch_size=f.batch_size,
                       overwrite=f.overwrite, mapping_file=f.mapping_file,
                       secret_file=f.link_secret_file, step=f.step)
  print(json.dumps(counts))
  return 0


def cli_main(argv=None) -> int:
  """``python -m crossrec_jax.score``; returns the exit code (see crossrec_jax/cli.py)."""
  from crossrec_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.run_absl(argv, _define_flags, _main)


if __name__ == "__main__":
  # Through the imported module, not __main__'s copy: its exception classes are the ones
  # crossrec_jax.cli recognises as user errors.
  from crossrec_jax import score as _module  # pylint: disable=import-self
  sys.exit(_module.cli_main())
