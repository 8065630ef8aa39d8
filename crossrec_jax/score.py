"""Batch inference from a training checkpoint of any encoder mode: score pairs or take the top-K
of each domain's whole catalog, streaming results to disk (``serving.scorer.Scorer`` does the
work; this is its command line).

python -m crossrec_jax.score --checkpoint runs/demo --users histories.csv --items items.csv \
    --output scores.parquet [--pairs pairs.csv] [--top_k 10] [--domains music,books]
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

from crossrec_jax.data import records as records_lib
from crossrec_jax.errors import ScoringError
from crossrec_jax.serving.scorer import Scorer


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
  scorer = Scorer.from_checkpoint(checkpoint, step=step, batch_size=batch_size,
                                  secret_file=secret_file, mapping_file=mapping_file)
  print(f"Scoring with checkpoint step {scorer.step} of {scorer.checkpoint_dir} "
        f"({scorer.mode} encoder mode)", file=sys.stderr, flush=True)
  item_table = records_lib.read_items(pathlib.Path(items))
  history = records_lib.read_interactions(pathlib.Path(users))
  common = dict(domains=domains, chunk_users=chunk_users, source=str(items))
  chosen, places = _read_pairs(pathlib.Path(pairs)) if pairs else (None, None)
  progress = _progress(len(chosen) if pairs else None, "pairs" if pairs else "users")
  writer = _AtomicTableWriter(output, fmt)
  users_seen = set()
  try:
    chunks = (scorer.score(history, item_table, chosen, places=places, progress=progress, **common)
              if pairs else
              scorer.recommend(history, item_table, top_k, progress=progress, **common))
    for columns in chunks:
      if columns:
        writer.write(columns)
        users_seen.update(columns["user_id"])
    writer.commit()
  except BaseException:
    writer.abort()  # never leave a partial file that looks complete
    raise
  finally:
    progress.close()
  counts = {"pairs": writer.rows} if pairs else {}
  return counts | {"users": len(users_seen), "items": len(item_table), "output": str(output),
                   "rows": writer.rows, "step": scorer.step, "encoder_mode": scorer.mode}


def _read_pairs(path: pathlib.Path) -> tuple[list[tuple[str, str, str]], list[str]]:
  """(user_id, item_id, domain) of each row of a pairs file, and each row's place."""
  names, rows = records_lib.iter_rows(path)
  missing = [c for c in ("user_id", "item_id", "domain") if c not in names]
  if missing:
    raise ScoringError(f"{path}: missing column(s) {missing}; pairs need user_id,item_id,domain")
  pairs, places = [], []
  for place, row in rows:
    pairs.append(tuple(str(row.get(c) or "").strip() for c in ("user_id", "item_id", "domain")))
    places.append(place)
  if not pairs:
    raise ScoringError(f"{path}: no pairs to score")
  return pairs, places


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
