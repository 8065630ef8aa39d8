"""Checks a training config and its workdir before any data is read or anything compiles, so a
typo fails in a second with the flag to fix instead of minutes (or checkpoints) later."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable

from etils import epath

from crossrec_jax.errors import ConfigError
from crossrec_jax.metrics import RATING_METRICS
from crossrec_jax.training import adversarial

K = 10  # the ranking cut-off the suggestions name (one of config.eval.ks by default)
IMPLICIT_METRICS = ("auc", "hr@K", "ndcg@K", "recall@K", "mrr@K")  # K: one of config.eval.ks
_AT_K = re.compile(r"(?:hr|ndcg|recall|mrr)@([1-9][0-9]*)")
_SLICES = r"(?:/(?:sampled|cold_users|cold_items))*"  # crossrec_jax/evaluation.py's slice keys

ENUMS: dict[str, tuple[str, ...]] = {
    "encoder_mode": ("frozen", "tune", "end_to_end"),
    "best_mode": ("max", "min"),
    "adversarial.method": adversarial.METHODS,
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
                "steps_per_run", "data.eval_limit", "data.num_negatives", "adversarial.steps",
                "optim.warmup_steps", "eval.sampled_negatives",
                "eval.cold_item_max_train")


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
  ks = tuple(config.eval.ks)
  if not ks or not all(isinstance(k, int) and k > 0 for k in ks):
    raise ConfigError(f"--config.eval.ks={ks!r} must be one or more positive integer cut-offs, "
                      "e.g. --config.eval.ks='(10, 20)'")
  check_adversarial(config)
  if config.data.source in ("byo", "movielens") and not config.data.path:
    raise ConfigError(f"--config.data.source={config.data.source} needs --config.data.path=DIR "
                      "(the folder with your data files)")
  if config.data.path and not epath.Path(config.data.path).exists():
    raise ConfigError(f"--config.data.path={config.data.path}: no such directory")
  if config.data.mapping_file and not epath.Path(config.data.mapping_file).is_file():
    raise ConfigError(f"--config.data.mapping_file={config.data.mapping_file}: no such file")
  if config.best_metric:
    _, metric = parse_best_metric(config.best_metric)
    at_k = _AT_K.fullmatch(metric)
    if at_k and int(at_k.group(1)) not in ks:
      raise ConfigError(f"--config.best_metric={config.best_metric!r}: K={at_k.group(1)} is not "
                        f"evaluated (--config.eval.ks={ks!r}); add it to --config.eval.ks or "
                        f"pick one of {ks}")
    known = _static_domains(config)
    if known is not None:
      check_best_metric(config.best_metric, known)
  if config.early_stopping_patience and not config.best_metric:
    raise ConfigError("--config.early_stopping_patience needs --config.best_metric (e.g. "
                      "music/ndcg@10 or books/rmse)")


def check_adversarial(config) -> None:
  """The adversarial method must suit the encoder mode (``adversarial.METHODS_BY_MODE``), with
  eps >= 0 and the weight w of L + w * L_adv in [0, 1]."""
  method, mode = config.adversarial.method, config.encoder_mode
  allowed = adversarial.METHODS_BY_MODE[mode]
  if method not in allowed:
    why = ("perturbs user / item vectors, which only the frozen mode trains on" if method == "apr"
           else "perturbs word embeddings, and the frozen mode trains no encoder" if mode == "frozen"
           else "needs per-example predictions, which the tune mode's loss does not return")
    raise ConfigError(f"--config.adversarial.method={method} is not supported with "
                      f"--config.encoder_mode={mode} ({method} {why}); allowed there: "
                      f"{', '.join(allowed)}")
  eps, w = config.adversarial.eps, config.adversarial.weight
  if eps is not None and eps < 0:
    raise ConfigError(f"--config.adversarial.eps={eps!r} must be >= 0 (None: the method's default)")
  if w is not None and not 0.0 <= w <= 1.0:
    raise ConfigError(f"--config.adversarial.weight={w!r} must be in [0, 1] (w of L + w * L_adv; "
                      "None: the method's default)")


def parse_best_metric(name: str) -> tuple[str, str]:
  """'music/ndcg@10', 'music/cold_users/ndcg@10' or 'music/sampled/hr@10' -> (domain, metric)."""
  m = re.fullmatch(rf"([^/]+){_SLICES}/([^/]+)", name)
  if not m or not (m.group(2) in RATING_METRICS or _is_implicit_metric(m.group(2))):
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
  if not (metric in RATING_METRICS if tasks[domain] == "rating" else _is_implicit_metric(metric)):
    raise ConfigError(f"--config.best_metric={name!r}: domain {domain!r} is "
                      f"{'explicit (ratings)' if tasks[domain] == 'rating' else 'implicit'}, its "
                      f"metrics are {', '.join(allowed)}")


def _is_implicit_metric(metric: str) -> bool:
  return metric == "auc" or _AT_K.fullmatch(metric) is not None


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
