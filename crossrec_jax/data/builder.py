"""tfds builder for every source (synthetic, bring-your-own directory, MovieLens native files).

Written as ``array_record`` and read back with ``as_data_source()``: no TensorFlow. Splits:
``train``, ``valid``, ``test`` (one example per target interaction) and ``items`` (the
catalog). Domain specs, counts and the validation report are stored in the dataset's
metadata. tfds writes into an ``incomplete.*`` directory and renames it when done, so a
failed prepare never leaves a half data set behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from crossrec_jax.data import fast_write, link_secret, movielens, synthetic
from crossrec_jax.data.examples import build_examples
from crossrec_jax.data.processing import ProcessingConfig
from crossrec_jax.data.records import (DataError, ValidationReport, check_against_items, find_table,
                                       read_interactions, read_items)

SOURCES = ("synthetic", "byo", "movielens")
SPLITS = ("train", "valid", "test", "history", "items")
DEFAULT_DATA_DIR = os.environ.get("CROSSREC_DATA_DIR", str(pathlib.Path("~/.cache/crossrec_jax/tfds").expanduser()))

_EXAMPLE_DEFAULTS = {
    "user_key": "", "domain": "", "domain_index": 0, "item_id": "", "item_text": "",
    "label": 0.0, "profile": "", "order": 0.0, "cold": False, "history_items": [],
    "user_in_train": False, "item_in_train": False, "raw_user_id": "", "item_tags": [],
    "user_tags": [],
}
_WRITE_BATCH = 4096  # examples serialized at once (bounded memory: the bytes of one batch)


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  source: str = "synthetic"
  path: str = ""
  bad_rows: str = "fail"   # fail | skip (skipped rows are counted in the metadata report)
  processing: ProcessingConfig = ProcessingConfig()
  synthetic: synthetic.SyntheticConfig = synthetic.SyntheticConfig()

  def fingerprint(self) -> str:
    """Changes with the options and with the input files' size / mtime."""
    stamp = dataclasses.asdict(self)
    # The data set is named by a digest of the linkage secret, never by the secret itself.
    stamp["processing"]["link_secret"] = link_secret.digest(self.processing.link_secret)
    if self.source == "synthetic":
      stamp["generator_version"] = synthetic.GENERATOR_VERSION
    if self.path:
      root = pathlib.Path(self.path)
      files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
      stamp["files"] = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    if self.processing.mapping_file:
      p = pathlib.Path(self.processing.mapping_file)
      stamp["mapping"] = (p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else None
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclasses.dataclass(eq=False)
class CrossDomainBuilderConfig(tfds.core.BuilderConfig):
  source_config: SourceConfig = SourceConfig()


class CrossDomain(tfds.core.GeneratorBasedBuilder):
  """Cross-domain interactions with per-example profile texts."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "history split: context-only interactions (no profile), so the "
                            "whole interaction log can be read back from the data set; "
                            "item_tags (categorical side features).",
                   "1.2.0": "user_tags (categorical user side features, e.g. demographics)."}

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Cross-domain recommendation examples (crossrec_jax).",
        features=tfds.features.FeaturesDict({
            "user_key": text, "domain": text, "domain_index": scalar(np.int32),
            "item_id": text, "item_text": text, "label": scalar(np.float32),
            "profile": text, "order": scalar(np.float64), "cold": scalar(np.bool_),
            "history_items": tfds.features.Sequence(text),
            "item_tags": tfds.features.Sequence(text),
            "user_tags": tfds.features.Sequence(text),
            "user_in_train": scalar(np.bool_), "item_in_train": scalar(np.bool_),
            "raw_user_id": text,
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # inputs are local
    source = self.builder_config.source_config
    processed = load_and_process(source)
    _check_splits({k for k, v in processed["examples"].items() if v},
                  getattr(self, "required_any_of", ()), source.path or source.source,
                  why=processed.get("split_note", ""))
    self.info.metadata.update({k: processed[k] for k in ("domains", "counts")})
    self.info.metadata["report"] = processed["report_metadata"]
    # tfds cannot write an empty split (e.g. no valid split under an 80/20 ratio): leave it out.
    groups = {name: records for name, records in processed["examples"].items() if records}
    groups["items"] = processed["items"]
    samples = [_EXAMPLE_DEFAULTS | r for records in groups.values() for r in records[:2]]
    self._serialize = fast_write.serializer(self.info.features, samples)
    return {name: self._generate_examples(records) for name, records in groups.items()}

  def _generate_examples(self, records):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    # disable=None: a bar on a terminal only (writing examples is most of a prepare's time).
    bar = tqdm(total=len(records), desc="writing examples", unit="example", unit_scale=True,
               file=sys.stderr, disable=None, leave=False)
    serialize = getattr(self, "_serialize", None)
    with bar:
      for start in range(0, len(records), _WRITE_BATCH):
        chunk = records[start:start + _WRITE_BATCH]
        if serialize:  # a batch at a time: the fast serializer works column by column
          yield from enumerate(serialize.batch(chunk, _EXAMPLE_DEFAULTS), start)
        else:
          yield from enumerate((_EXAMPLE_DEFAULTS | r for r in chunk), start)
        bar.update(len(chunk))


def read_source(config: SourceConfig):
  """Reads and validates the configured source: (interactions, items, validation report).

  ``processing.domains``, when set, keeps only those domains (e.g. a single-domain model).
  """
  if config.source not in SOURCES:
    raise DataError(f"unknown data source {config.source!r}; use one of {SOURCES}")
  report = ValidationReport()
  if config.source == "synthetic":
    interactions, items = synthetic.generate(config.synthetic)
  elif config.source == "movielens":
    interactions, items = movielens.read_movielens(config.path)
  else:
    if not config.path:
      raise DataError("source 'byo' needs path: a directory with interactions.{csv,jsonl,parquet} "
                      "and items.{csv,jsonl,parquet}")
    items_path = find_table(config.path, "items")
    interactions_path = find_table(config.path, "interactions")
    scales = {d: (lo, hi) for d, lo, hi in config.processing.rating_scales}
    items = read_items(items_path, bad_rows=config.bad_rows, report=report)
    interactions = read_interactions(interactions_path, bad_rows=config.bad_rows, report=report,
                                     rating_scales=scales,
                                     domain_tasks=dict(config.processing.domain_tasks))
    interactions = check_against_items(interactions, items, items_path,
                                       bad_rows=config.bad_rows, report=report)
    report.log_summary(config.path)
    if not interactions:
      raise DataError(f"{interactions_path}: no interaction is left after validation")
  keep = config.processing.domains
  if keep:
    present = sorted({x.domain for x in interactions})
    unknown = sorted(set(keep) - set(present))
    if unknown:
      raise DataError(f"{config.path or config.source}: domain(s) {unknown} not in the data "
                      f"(it has {present}); fix data.domains")
    interactions = [x for x in interactions if x.domain in keep]
    items = {k: v for k, v in items.items() if k[0] in keep}
  return interactions, items, report


def load_and_process(config: SourceConfig) -> dict[str, Any]:
  """Reads, validates and processes the configured source (no tfds involved)."""
  interactions, items, report = read_source(config)
  processed = build_examples(interactions, items, _with_secret(config).processing)
  report.duplicates.update(processed.pop("duplicates", {}))
  processed["report"] = report.to_dict()
  processed["report_metadata"] = report.to_metadata()
  return processed


def prepare(source: str = "synthetic", path: str = "", *, data_dir: str | None = None,
            bad_rows: str = "fail", processing: ProcessingConfig = ProcessingConfig(),
            synthetic_config: synthetic.SyntheticConfig = synthetic.SyntheticConfig(),
            require_any_of: tuple[tuple[str, str], ...] = ()) -> tfds.core.DatasetBuilder:
  """Prepares (once, cached under ``data_dir``) and returns the builder.

  ``require_any_of``: (split, config key) pairs of which at least one split must have rows
  (evaluation); checked before anything is written. Two prepares in one ``data_dir`` take
  turns (a lock on the directory); a failed one leaves no folder it created.
  """
  if path and not pathlib.Path(path).exists():
    raise DataError(f"{path}: data directory does not exist")
  source_config = _with_secret(SourceConfig(source, str(path), bad_rows, processing,
                                            synthetic_config))
  config = CrossDomainBuilderConfig(name=f"{source}_{source_config.fingerprint()}",
                                    source_config=source_config)
  root = pathlib.Path(data_dir or DEFAULT_DATA_DIR)
  make = lambda: CrossDomain(config=config, data_dir=str(root), file_format="array_record")
  builder = None if not root.exists() else make()
  if builder is None or not builder.is_prepared():
    created = [d for d in (root, root / "downloads", root / "cross_domain",
                           root / "cross_domain" / config.name) if not d.exists()]
    try:
      root.mkdir(parents=True, exist_ok=True)
      with _DirectoryLock(root):
        builder = make()  # another process may have finished it while this one waited
        if not builder.is_prepared():
          _remove_stale_incomplete(root / "cross_domain")
          tfds.disable_progress_bar()  # our own bars: rows read, examples written
          builder.required_any_of = tuple(require_any_of)
          with (fast_write.pass_serialized_through(), fast_write.array_record_options(),
                _gc_paused()):
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except BaseException:
      for d in reversed(created):  # deepest first; only folders this call created
        _remove_empty_tree(d)
      raise
  _check_splits(builder.info.splits, require_any_of, str(path or source))
  return builder


@contextlib.contextmanager
def _gc_paused():
  """No cyclic garbage collection while a data set is built: a prepare allocates millions of
  objects (rows, records, their bytes) and keeps nearly all of them, so every collection scans
  a growing heap for cycles it does not find (~20% of a prepare's CPU, more in a process that
  has imported much). Memory is still freed by reference counting; collection resumes after."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


class _DirectoryLock:
  """An exclusive flock on the data directory itself (no lock file is left behind)."""

  def __init__(self, directory: pathlib.Path):
    self.directory, self.fd = directory, None

  def __enter__(self):
    try:
      import fcntl  # pylint: disable=import-outside-toplevel
    except ImportError:  # not POSIX: no cross-process lock
      return self
    self.fd = os.open(self.directory, os.O_RDONLY)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"crossrec_jax: another process is preparing data in {self.directory}; waiting for "
            "it to finish", file=sys.stderr, flush=True)
      fcntl.flock(self.fd, fcntl.LOCK_EX)
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      os.close(self.fd)  # closing releases the flock


def _remove_stale_incomplete(datasets: pathlib.Path):
  """``incomplete.*`` folders of a killed prepare (only ever called under the lock)."""
  if datasets.is_dir():
    for stale in datasets.glob("*/incomplete.*"):
      print(f"crossrec_jax: removing {stale}, left by an interrupted prepare", file=sys.stderr)
      shutil.rmtree(stale, ignore_errors=True)


def _remove_empty_tree(directory: pathlib.Path):
  if not directory.is_dir():
    return
  for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
    if not any(sub.iterdir()):
      sub.rmdir()
  if not any(directory.iterdir()):
    directory.rmdir()


def _check_splits(present, require_any_of, what: str, why: str = ""):
  if require_any_of and not any(split in present for split, _ in require_any_of):
    keys = ", ".join(f"{key}={split!r}" for split, key in require_any_of)
    raise DataError(f"{what}: the data have no {' or '.join(s for s, _ in require_any_of)} "
                    f"rows, so evaluation ({keys}) has nothing to evaluate{why}. Give the data a "
                    "split column with valid/test rows, use data.split='ratio', or point "
                    f"{require_any_of[0][1]} at a split the data have")


def _with_secret(config: SourceConfig) -> SourceConfig:
  """``config`` with its linkage secret resolved (data.link_secret) when none was given."""
  if config.processing.link_secret:
    return config
  secret = link_secret.resolve(config.source, config.path).value
  return dataclasses.replace(config, processing=dataclasses.replace(config.processing,
                                                                    link_secret=secret))


def metadata(builder) -> dict[str, Any]:
  return dict(builder.info.metadata)


def decode_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
