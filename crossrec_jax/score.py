"""Batch inference from a training checkpoint: encode every distinct user and item once, then
score pairs or take the top-K of each domain's whole catalog, streaming results to disk.

python -m crossrec_jax.score --checkpoint runs/demo --users histories.csv --items items.csv \
    --output scores.parquet [--pairs pairs.csv] [--top_k 10] [--domains music,books]
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import sys
from typing import Any

import ml_collections
import numpy as np

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import rundir
from crossrec_jax.errors import ScoringError  # noqa: F401 (public here: the scoring CLI's error)
from crossrec_jax.data import link_secret, processing, records as records_lib
# Moved to crossrec_jax/rundir.py and crossrec_jax/serving/scorer.py; importable from here as before.
from crossrec_jax.rundir import (KNOWN_IDS_FILE, id_hash, scoring_secret,  # noqa: F401
                                 write_known_ids)
from crossrec_jax.rundir import checkpoint_paths as _checkpoint_paths  # noqa: F401
from crossrec_jax.serving.scorer import LENGTH_BUCKETS, Scorer  # noqa: F401


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
  config = _with_mapping(scorer.config, mapping_file)
  secret = scorer.link_secret or link_secret.LinkSecret(
      config.data.get("link_secret") or link_secret.DEMO_SECRET, "config")
  # The same conversion and linkage training used: same profile caps, secret and mapping.
  pconfig = processing_config(config, secret)
  by_person, _, person_of = processing.linked_histories(history, pconfig)
  return items, by_person, tasks, pconfig, person_of


def _with_mapping(config, mapping_file):
  """The training config with ``--mapping_file`` (if given) in place of its data.mapping_file,
  checked to exist: without the mapping, users would be linked otherwise than in training."""
  if mapping_file is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.mapping_file = mapping_file
  if config.data.get("mapping_file") and not pathlib.Path(config.data.mapping_file).is_file():
    raise ScoringError(f"the model was trained with data.mapping_file={config.data.mapping_file}, "
                       "which does not exist here; pass --mapping_file with that mapping")
  return config


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
  if _is_hybrid(checkpoint, step):
    return _run_frozen(checkpoint, users, items, output, fmt, pairs=pairs, top_k=top_k,
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


def _is_hybrid(checkpoint, step=None) -> bool:
  _, ckpt_dir = rundir.checkpoint_paths(checkpoint)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    available = checkpointer.all_steps()
    if not available or (step is not None and step not in available):
      return False  # Scorer.from_checkpoint says what is wrong
    meta = rundir.newest_meta(checkpointer, [step] if step is not None else available)
  finally:
    checkpointer.close()
  return (meta.get("model") or {}).get("encoder_mode") in ("frozen", "tune")


def _run_frozen(checkpoint, users, items, output, fmt, *, pairs, top_k, domains, mapping_file,
                secret_file) -> dict[str, Any]:
  """A frozen or tune run: its fused model (network + item-item CF), as its evaluation served it."""
  from crossrec_jax.serving import hybrid as hybrid_serving
  from crossrec_jax.training import tune
  from crossrec_jax.data.from_config import processing_config  # pylint: disable=import-outside-toplevel
  workdir, ckpt_dir = rundir.checkpoint_paths(checkpoint)
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, async_save=False)
  try:
    meta = rundir.newest_meta(checkpointer, checkpointer.all_steps())
  finally:
    checkpointer.close()
  config = _with_mapping(ml_collections.ConfigDict(meta["config"]), mapping_file)
  secret = rundir.scoring_secret(meta, secret_file)
  model, data, step = tune.load(workdir, config, secret)  # the tune mode's model if it ran
  print(f"Scoring with the {'tune' if tune.has_tuned(workdir) else 'frozen'}-mode model of checkpoint step {step} of {ckpt_dir}", file=sys.stderr,
        flush=True)
  wanted = list(domains) if domains else data.names
  for name in wanted:
    if name not in data.names:
      raise ScoringError(f"--domains: unknown domain {name!r}; this model has {data.names}")
  item_table = records_lib.read_items(pathlib.Path(items))
  history = records_lib.check_against_items(records_lib.read_interactions(pathlib.Path(users)),
                                            item_table, items)
  by_person, user_key, person_of = processing.linked_histories(
      history, processing_config(config, secret))
  writer = _AtomicTableWriter(output, fmt)
  progress = _progress(None if pairs else len(by_person), "pairs" if pairs else "users")
  try:
    if pairs:
      counts = hybrid_serving.score_pairs(model, data, by_person, user_key, item_table,
                                        pathlib.Path(pairs), person_of, wanted, writer.write,
                                        items_path=items, progress=progress)
    else:
      counts = hybrid_serving.score_top_k(model, data, by_person, user_key, item_table, wanted, top_k,
                                        writer.write, items_path=items, progress=progress)
    writer.commit()
  except hybrid_serving.CatalogError as e:
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
