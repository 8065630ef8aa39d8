"""What a training workdir holds and how it is opened, for train, evaluate and score alike.

    WORKDIR/checkpoints/      Orbax steps (crossrec_jax.checkpoint)
    WORKDIR/tokenizer/        the tokenizer the run trained with (self-contained inference)
    WORKDIR/known_ids.npz     hashes of the user / item IDs seen in training
    WORKDIR/metrics.jsonl     one line per logged step / evaluation
    WORKDIR/tensorboard/      TensorBoard events

Paths go through ``etils.epath``, so a ``gs://bucket/run`` workdir works the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import types
from typing import Sequence

import jax
import numpy as np
from etils import epath

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax.errors import ScoringError
from crossrec_jax.data import link_secret
from crossrec_jax.data.pipeline import stable_bucket

KNOWN_IDS_FILE = "known_ids.npz"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"


def id_hash(key: str) -> int:
  return stable_bucket(key, 1 << 62)


def write_known_ids(workdir, user_keys: Sequence[str], item_keys: Sequence[str]) -> None:
  """Hashes of the user / item IDs seen in training (so scoring gives them their ID rows)."""
  with (epath.Path(workdir) / KNOWN_IDS_FILE).open("wb") as f:
    np.savez(f, users=np.unique(np.array([id_hash(k) for k in user_keys], np.int64)),
             items=np.unique(np.array([id_hash(k) for k in item_keys], np.int64)))


def read_known_ids(workdir) -> dict[str, np.ndarray] | None:
  """``{"users", "items"}`` hashes, or None for a run that wrote none."""
  known = epath.Path(workdir) / KNOWN_IDS_FILE
  if not known.exists():
    return None
  with known.open("rb") as f:
    return dict(np.load(f))


def checkpoint_paths(path) -> tuple[epath.Path, epath.Path]:
  """(workdir, its checkpoints/ folder) from either of them, given as ``--checkpoint``."""
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


def local_copy(directory: epath.Path, into: str) -> str:
  """A local path for ``directory`` (a bucket folder is copied: tokenizers load from disk)."""
  if "://" not in str(directory):
    return str(directory)
  for f in directory.iterdir():
    f.copy(epath.Path(into) / f.name)
  return into


def save_tokenizer(tokenizer, target: epath.Path) -> None:
  """``save_pretrained`` writes local files only: a bucket workdir gets a copy of them."""
  if "://" not in str(target):
    tokenizer.save_pretrained(str(target))
    return
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    target.mkdir(parents=True, exist_ok=True)
    for f in epath.Path(tmp).iterdir():
      f.copy(target / f.name, overwrite=True)


def append_jsonl(path: epath.Path, record: dict) -> None:
  """One JSON line; object stores have no append, so a bucket file is rewritten (it is small)."""
  line = json.dumps(record) + "\n"
  if "://" not in str(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(line)
  else:
    path.write_text((path.read_text() if path.exists() else "") + line)


@contextlib.contextmanager
def remove_if_failed_early(workdir):
  """A workdir this run created is removed if the run fails before its first step (yielded
  ``progress.started`` still False) and before writing a checkpoint, a metrics line or the
  text cache: no half-built workdir (e.g. only a tokenizer) is left behind."""
  path = epath.Path(workdir)
  created = not path.exists()
  progress = types.SimpleNamespace(started=False)
  try:
    yield progress
  except BaseException:
    kept = ("checkpoints", METRICS_FILE, "text_cache")
    if created and not progress.started and jax.process_index() == 0 and path.exists() and not any(
        (path / k).exists() for k in kept):
      if "://" in str(path):
        path.rmtree()
      else:
        shutil.rmtree(path, ignore_errors=True)
    raise


def newest_meta(checkpointer, candidates) -> dict:
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
