"""Checks a training config and its workdir before any data is read or anything compiles, so a
typo fails in a second with the flag to fix instead of minutes (or checkpoints) later."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

from etils import epath

from crossrec_jax.errors import ConfigError
from crossrec_jax.metrics import RATING_METRICS

K = 10  # the ranking cut-off of evaluation (HR@K, NDCG@K)
IMPLICIT_METRICS = ("auc", f"hr@{K}", f"ndcg@{K}")

ENUMS: dict[str, tuple[str, ...]] = {
    "encoder_mode": ("frozen", "tune", "end_to_end"),
    "best_mode": ("max", "min"),
    "adversarial.method": ("none", "fgm", "pgd", "smart"),
    "data.source": ("synthetic", "byo", "movielens"),
    "data.split": ("auto", "given", "leave_last_out", "ratio"),
    "data.bad_rows": ("fail", "skip"),
    "model.pooling": ("mean", "cls", "pooler"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "optim.schedule": ("linear", "cosine", "constant"),
}
POSITIVE = ("batch_size", "log_every", "keep_checkpoints", "model.dim", "model.tower_dim",
            "model.retrieval_dim", "data.user_max_length", "data.item_max_length",
            "optim.accumulate_steps")
NON_NEGATIVE = ("train_steps", "eval_every", "checkpoint_every", "early_stopping_patience",
                "steps_per_run", "data.eval_limit", "data.num_negatives", "adversarial.eps",
                "adversarial.steps", "optim.warmup_steps")


def _get(config, dotted: str) -> Any:
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def validate_config(config) -> None:
  """Raises ``ConfigError`` naming ``--config.FIELD`` for the first value that cannot work."""
  for key, allowed in ENUMS.items():
    value = _get(config, key)
    if value not in allowed:
      raise ConfigError(f"--config.{key}={value!r} is not one of {', '.join(allowed)}; "
                        f"set --config.{key}={allowed[0]} (or another of these)")
  for key in POSITIVE:
    if _get(config, key) <= 0:
      raise ConfigError(f"--config.{key}={_get(config, key)!r} must be positive")
  for key in NON_NEGATIVE:
    if _get(config, key) < 0:
      raise ConfigError(f"--config.{key}={_get(config, key)!r} must be >= 0")
  w = config.adversarial.weight
  if not 0.0 <= w <= 1.0:
    raise ConfigError(f"--config.adversarial.weight={w!r} must be in [0, 1] (the share of the "
                      "adversarial loss)")
  if config.data.source in ("byo", "movielens") and not config.data.path:
    raise ConfigError(f"--config.data.source={config.data.source} needs --config.data.path=DIR "
                      "(the folder with your data files)")
  if config.data.path and not epath.Path(config.data.path).exists():
    raise ConfigError(f"--config.data.path={config.data.path}: no such directory")
  if config.data.mapping_file and not epath.Path(config.data.mapping_file).is_file():
    raise ConfigError(f"--config.data.mapping_file={config.data.mapping_file}: no such file")
  if config.best_metric:
    parse_best_metric(config.best_metric)
    known = _static_domains(config)
    if known is not None:
      check_best_metric(config.best_metric, known)
  if config.early_stopping_patience and not config.best_metric:
    raise ConfigError("--config.early_stopping_patience needs --config.best_metric (e.g. "
                      "music/ndcg@10 or books/rmse)")


def parse_best_metric(name: str) -> tuple[str, str]:
  """'music/ndcg@10' or 'music/cold/ndcg@10' -> (domain, metric)."""
  m = re.fullmatch(r"([^/]+)(?:/cold)?/([^/]+)", name)
  if not m or m.group(2) not in RATING_METRICS + IMPLICIT_METRICS:
    raise ConfigError(f"--config.best_metric={name!r}: expected DOMAIN/METRIC with METRIC one of "
                      f"{', '.join(RATING_METRICS + IMPLICIT_METRICS)} (e.g. books/rmse, "
                      "music/ndcg@10), or '' to keep only the latest checkpoints")
  return m.group(1), m.group(2)


def check_best_metric(name: str, domains: Iterable[dict]) -> None:
  """``domains``: the data set's domain specs (dicts with name and task)."""
  domain, metric = parse_best_metric(name)
  tasks = {d["name"]: d["task"] for d in domains}
  if domain not in tasks:
    suggestion = next(iter(sorted(tasks)), "DOMAIN")
    metric_for = "rmse" if tasks.get(suggestion) == "rating" else f"ndcg@{K}"
    raise ConfigError(f"--config.best_metric={name!r} names domain {domain!r}, but the data has "
                      f"{sorted(tasks)}; set --config.best_metric={suggestion}/{metric_for} or "
                      "--config.best_metric=''")
  allowed = RATING_METRICS if tasks[domain] == "rating" else IMPLICIT_METRICS
  if metric not in allowed:
    raise ConfigError(f"--config.best_metric={name!r}: domain {domain!r} is "
                      f"{'explicit (ratings)' if tasks[domain] == 'rating' else 'implicit'}, its "
                      f"metrics are {', '.join(allowed)}")


def _static_domains(config) -> list[dict] | None:
  """Domains known without reading data (the synthetic generator's), else None."""
  if config.data.source != "synthetic":
    return None
  from crossrec_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  keep = tuple(config.data.domains)
  return [{"name": n, "task": t} for n, (t, _) in synthetic.DOMAINS.items() if not keep or n in keep]


def check_workdir(workdir, *, must_exist: bool = False) -> epath.Path:
  """The workdir as an ``epath.Path`` (gs:// stays gs://); a file, an unwritable parent or
  (for evaluate / score) a missing directory is a ``ConfigError``. Creates nothing."""
  if not str(workdir):
    raise ConfigError("--workdir is empty; pass the run directory")
  path = epath.Path(workdir)
  if _is_local(path):
    path = path.expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"--workdir {path} is a file, not a directory; pass a directory path")
  if must_exist:
    if not path.exists():
      raise ConfigError(f"--workdir {path} does not exist (mistyped?); pass the workdir of a "
                        "crossrec_jax.train run")
    return path
  if _is_local(path):
    parent = path
    while not parent.exists():
      parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
      raise ConfigError(f"--workdir {path}: {parent} is not writable; choose a directory you "
                        "can write to")
  return path


def _is_local(path) -> bool:
  return "://" not in str(path)
