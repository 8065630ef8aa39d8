"""Orbax checkpoints of a training run: train state + data-iterator state + a self-contained
description (config, model config, tokenizer directory), keeping the last K and the best one;
which way ``best_metric`` improves (``best_mode``) and early stopping on it (``EarlyStopping``).

Items of a step: ``params`` (the model weights), ``state`` (the rest of the train state: step,
optimizer state, rng), ``data_iter`` and ``meta`` (JSON). Serving restores ``params`` alone, so
the optimizer moments are never read. Checkpoints written before the split hold the whole train
state in ``state`` (and no ``params`` item); they are detected per step and still restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from crossrec_jax import sharding
from crossrec_jax.metrics import RATING_METRICS

log = logging.getLogger(__name__)


class CheckpointIncompatibleError(RuntimeError):
  """A checkpoint that does not fit the model / config being restored."""


def best_mode(config) -> str:
  """"min" or "max": how ``config.best_metric`` improves (rating errors, rmse and mae, are always
  minimised, whatever ``config.best_mode`` says)."""
  if config.best_metric.split("/")[-1] in RATING_METRICS:
    return "min"
  return config.best_mode


class EarlyStopping:
  """Counts evaluations since ``metric`` last improved; stops after ``patience`` of them
  (never when ``metric`` or ``patience`` is unset)."""

  def __init__(self, metric: str, patience: int, mode: str = "max"):
    self.metric, self.patience, self.mode = metric, patience, mode
    self.best: float | None = None
    self.evals_since_best = 0

  @classmethod
  def from_config(cls, config) -> "EarlyStopping":
    return cls(config.best_metric, config.early_stopping_patience, best_mode(config))

  def update(self, metrics: dict[str, float]) -> bool:
    """Records one evaluation's ``{"domain/metric": value}``; True when training should stop."""
    if not (self.metric and self.patience):
      return False
    value = metrics.get(self.metric)
    if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
      self.best, self.evals_since_best = value, 0
    else:
      self.evals_since_best += 1
    return self.evals_since_best >= self.patience


class Checkpointer:

  @classmethod
  def from_config(cls, config, directory) -> "Checkpointer":
    """A training run's checkpointer: ``keep_checkpoints``, ``best_metric`` (its ``best_mode``)
    and ``async_checkpointing`` of ``config``."""
    return cls(directory, keep=config.keep_checkpoints, best_metric=config.best_metric,
               best_mode=best_mode(config), async_save=config.async_checkpointing)

  def __init__(self, directory, *, keep: int = 2, best_metric: str = "", best_mode: str = "max",
               async_save: bool = True):
    # epath keeps gs://bucket/run intact (pathlib would collapse it to gs:/bucket/run).
    self.directory = epath.Path(directory)
    if "://" not in str(self.directory):
      self.directory = self.directory.absolute()
    self.skipped: list[tuple[int, str]] = []  # (step, why) passed over by the last restore
    self._params_reader = None  # a read-only manager for params-only restores (made on use)
    preserve = [policies.LatestN(keep)]
    if best_metric:
      preserve.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=1,
                                     reverse=best_mode == "min",
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
        "params": ocp.StandardCheckpointHandler(), "state": ocp.StandardCheckpointHandler(),
        "data_iter": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_iter_state: bytes | None, meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    data = json.loads(data_iter_state) if data_iter_state else {}
    params, rest = _split(state)
    items = {"data_iter": ocp.args.JsonSave(data), "meta": ocp.args.JsonSave(meta)}
    if params is not None:
      items["params"] = ocp.args.StandardSave(params)
    if params is None or jax.tree.leaves(rest):  # Orbax cannot save a tree without arrays
      items["state"] = ocp.args.StandardSave(rest)
    self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(**items))

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (multi-host)."""
    return self.manager.reached_preemption(step)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def read_meta(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def restore(self, abstract_state, *, expected_meta: dict[str, Any] | None = None,
              max_step: int | None = None, params_only: bool = False):
    """Latest restorable checkpoint -> (step, state, data_iter_state bytes, meta) or None.

    A corrupt latest checkpoint is reported and the previous one used; an incompatible one
    (other model shape / config) raises ``CheckpointIncompatibleError``: never a silent fresh
    start over existing checkpoints.

    ``params_only``: ``abstract_state`` is the abstract *params* tree and only the ``params``
    item is read (from a checkpoint of the older one-item layout: that subtree of ``state``,
    by an Orbax partial restore): serving never reads or allocates the optimizer moments.
    Returns (step, params, None, meta).
    """
    steps = [s for s in self.all_steps() if max_step is None or s <= max_step]
    errors = []
    for step in reversed(steps):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint %s/%d is unreadable (%s); trying the previous one",
                    self.directory, step, e)
        continue
      if expected_meta is not None:
        _check_compatible(self.directory / str(step), meta, expected_meta)
      try:
        items = self.manager.item_metadata(step)
        split = "params" in items  # else the one-item layout written before the split
        saved_shapes = _shapes({"params": items["params"], **(items.get("state") or {})}
                               if split else items["state"])
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint %s/%d has unreadable metadata (%s); trying the previous one",
                    self.directory, step, e)
        continue
      # Compare shapes before reading any array: a mismatch is a different model, not corruption.
      wanted = _shapes({"params": abstract_state} if params_only else abstract_state)
      diff = [f"{k}: saved {saved_shapes.get(k)} vs expected {v}" for k, v in wanted.items()
              if saved_shapes.get(k) != v]
      if diff:
        raise CheckpointIncompatibleError(
            f"{self.directory / str(step)}: the saved train state does not match this model "
            f"({len(diff)} arrays differ, e.g. {'; '.join(diff[:3])}). Use a new --workdir for a "
            "different model, or restore the matching config.")
      try:
        if split:
          restored = self._read_split(step, abstract_state, params_only)
        elif params_only:
          restored = {"state": self._read_params(step, abstract_state), "data_iter": None}
        else:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data_iter=ocp.args.JsonRestore()))
      except (ValueError, KeyError) as e:
        if "shape" in str(e).lower() or "structure" in str(e).lower() or isinstance(e, KeyError):
          raise CheckpointIncompatibleError(
              f"{self.directory / str(step)}: the saved train state does not match this model "
              f"({e}). Use a new --workdir for a different model, or restore the matching config.") from e
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint %s/%d is corrupt (%s); trying the previous one", self.directory, step, e)
        continue
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f"step {step}: {type(e).__name__}: {e}")
        log.warning("checkpoint %s/%d is corrupt (%s); trying the previous one", self.directory, step, e)
        continue
      if errors:
        self.skipped = [(int(e.split(":")[0].split()[1]), e) for e in errors]
        newest = self.skipped[0][0]
        message = (f"WARNING: the newest checkpoint, step {newest} in {self.directory}, is "
                   f"unreadable; restored step {step} instead. Skipped: {'; '.join(errors)}")
        log.warning("%s", message)
        print(message, file=sys.stderr, flush=True)
      data = restored["data_iter"]
      return step, restored["state"], json.dumps(data).encode() if data else None, meta
    if steps:
      raise CheckpointIncompatibleError(
          f"{self.directory}: no checkpoint could be restored ({'; '.join(errors)}). Move the "
          "directory away to start fresh; it is left untouched.")
    return None

  def _read_split(self, step: int, abstract_state, params_only: bool):
    """Step's ``params`` item alone (``params_only``), or the train state joined from its
    ``params`` and ``state`` items, with the data-iterator state."""
    if params_only:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_state)))
      return {"state": restored["params"], "data_iter": None}
    abstract_params, abstract_rest = _split(abstract_state)
    items = {"params": ocp.args.StandardRestore(abstract_params),
             "data_iter": ocp.args.JsonRestore()}
    if jax.tree.leaves(abstract_rest):
      items["state"] = ocp.args.StandardRestore(abstract_rest)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    rest = restored["state"] if "state" in items else abstract_rest
    return {"state": _join(abstract_state, restored["params"], rest),
            "data_iter": restored["data_iter"]}

  def _read_params(self, step: int, abstract_params):
    """The ``params`` subtree of step's saved train state (one-item layout), nothing else read."""
    # StandardCheckpointHandler restores whole trees only; the PyTree handler reads the same
    # files and can leave subtrees (optimizer state, step, rng) on disk.
    if self._params_reader is None:
      self._params_reader = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
          item_handlers={"state": ocp.PyTreeCheckpointHandler()})
    target = {"params": abstract_params}
    restored = self._params_reader.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
    return restored["state"]["params"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    if self._params_reader is not None:
      self._params_reader.close()


def _with_defaults(model_meta):
  """A saved model config with fields added since it was written set to their defaults, so a
  new init-only option does not make older checkpoints look incompatible."""
  from crossrec_jax.models.recommender import RecommenderConfig  # pylint: disable=import-outside-toplevel
  try:
    return json.loads(json.dumps(RecommenderConfig.from_dict(model_meta).to_dict(), default=list))
  except (TypeError, KeyError, ValueError):
    return model_meta  # unknown or malformed fields: compared as written


def _check_compatible(path, meta, expected):
  saved_secret = (meta.get("link_secret") or {}).get("digest")
  wanted_secret = (expected.get("link_secret") or {}).get("digest")
  if saved_secret and wanted_secret and saved_secret != wanted_secret:
    raise CheckpointIncompatibleError(
        f"{path}: its users were linked with another secret (digest {saved_secret}, from "
        f"{meta['link_secret'].get('origin')}) than this run's (digest {wanted_secret}, from "
        f"{expected['link_secret'].get('origin')}); set the same secret (CROSSREC_LINK_SECRET or "
        "data.link_secret_file) or use a new --workdir")
  for key in ("model",):
    saved, wanted = _with_defaults(meta.get(key) or {}), _with_defaults(expected.get(key) or {})
    if saved != wanted:
      diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
      raise CheckpointIncompatibleError(
          f"{path}: checkpoint was written for another model (differs in {diff}). Use a new "
          "--workdir, or pass the config the checkpoint was trained with.")


def _split(state):
  """(params, the rest of the train state as a dict); (None, state) for a state without params."""
  if isinstance(state, dict) and "params" in state:
    return state["params"], {k: v for k, v in state.items() if k != "params"}
  if dataclasses.is_dataclass(state) and hasattr(state, "params"):
    return state.params, {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
                          if f.name != "params"}
  return None, state


def _join(abstract_state, params, rest):
  """The inverse of ``_split``, in the type of ``abstract_state``."""
  if isinstance(abstract_state, dict):
    return {**rest, "params": params}
  return dataclasses.replace(abstract_state, params=params, **rest)


def _shapes(tree) -> dict[str, tuple]:
  """'a/b/0/c' -> shape for every array of a train state or of its Orbax metadata."""
  return {"/".join(str(sharding.key_name(e)) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(leaf, "shape")}


def abstract_like(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
