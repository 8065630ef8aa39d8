"""``config.encoder_mode = "frozen"``: the served model of a run (the default path).

prepare data (tfds) -> interaction log -> frozen-encoder item vectors, cached in
``workdir/text_cache`` (keyed by encoder weights, texts and max length, reused by later runs)
-> hybrid model (``training.hybrid``) -> item-item CF (kNN, EASE) fitted on the same train
split -> fusion weights tuned per implicit domain on valid -> Orbax checkpoint (params + the
settings, fusion weights and CF hyper-parameters as JSON) -> valid / test metrics next to the
popularity / item-mean baselines.

Training runs through the one loop (``training/loop.py``) on the device mesh: periodic
checkpoints (state + batch-iterator state, so a resume is exact), SIGTERM, the finite-loss
check, ``steps_per_run``, ``best_metric`` and early stopping on the network's valid metrics.
Re-running with a finished checkpoint present restores it instead of training again (CF parts
are refitted: they are deterministic functions of the train split).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from etils import epath

from crossrec_jax import baselines as bl
from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import config_check
from crossrec_jax import data as data_lib
from crossrec_jax import fusion, metric_writers, sharding, text_cache
from crossrec_jax.training import loop
from crossrec_jax.training.hybrid import FittedHybrid, build_trainer
from crossrec_jax.training.inputs import HybridSettings
from crossrec_jax.data.from_config import (prepare_data, public_config_dict,
                                          resolve_link_secret, resolve_model_checkpoint,
                                          secret_description)
from crossrec_jax.interactions import InteractionData

NEURAL = "neural"


@dataclasses.dataclass
class ServedModel:
  """The served model: the hybrid network, CF components, per-domain fusion weights and the
  cold-item terms (``fusion.ColdItems``) of the domains that have them."""
  hybrid: FittedHybrid
  cf: dict[str, bl.Recommender]
  weights: dict[int, dict[str, float]]
  cold: dict[int, fusion.ColdItems] = dataclasses.field(default_factory=dict)

  def score_catalog(self, queries, domain: int) -> np.ndarray:
    """Fused scores where the domain has weights (implicit domains), else the network's."""
    neural = self.hybrid.score_catalog(queries, domain)
    w = self.weights.get(domain)
    if not w:
      return neural
    cold = self.cold.get(domain)
    used = {n for n, v in w.items() if v} | ({n for n, b in cold.boost.items() if b} if cold else set())
    parts = {n: m.score_catalog(queries, domain) for n, m in self.cf.items() if n in used}
    parts[NEURAL] = neural
    return np.asarray(fusion.fuse(parts, w, cold))

  def score_pairs(self, queries) -> np.ndarray:
    return self.hybrid.score_pairs(queries)

  def fusion_meta(self) -> dict:
    """The fusion as the checkpoint's JSON metadata holds it (``fusion_from_meta`` reads it)."""
    return {"fusion_weights": {str(d): w for d, w in self.weights.items()},
            "cold_fusion": {str(d): c.to_json() for d, c in self.cold.items()}}


def fusion_from_meta(saved: dict, data: InteractionData):
  """(weights, cold-item terms) of a finished checkpoint's metadata."""
  weights = {int(d): w for d, w in saved["fusion_weights"].items()}
  counts = data.item_counts(("train",))
  cold = {int(d): fusion.ColdItems.from_json(c, counts[data.offsets[int(d)]:data.offsets[int(d) + 1]])
          for d, c in saved.get("cold_fusion", {}).items()}
  return weights, cold


class PerDomain:
  """One fitted model per domain behind the one ``score_catalog(queries, domain)`` interface
  (item-kNN with each domain's k and shrinkage)."""

  def __init__(self, models: dict[int, bl.Recommender], name: str):
    self.models, self.name = models, name

  def score_catalog(self, queries, domain: int) -> np.ndarray:
    return self.models[domain].score_catalog(queries, domain)


def fit_cf(data: InteractionData, config, text=None, knn_params: dict | None = None
           ) -> tuple[dict[str, Any], dict[int, dict]]:
  """The fusion's non-network components and item-kNN's (k, shrink) per implicit domain:
  ``knn_params`` when given (a restored run's), else tuned on the valid split over
  ``fusion.knn_k`` x ``fusion.knn_shrink`` (NDCG@10). ``text``: the frozen encoder's item
  vectors, for the content-based text-kNN (the component that ranks items CF has not seen).
  The order (item-kNN, EASE, text-kNN) is the fusion grid's order."""
  implicit = [d for d in range(len(data.domains)) if data.task(d) == "implicit"]
  if not implicit:
    return {}, {}
  f, cf, params = config.fusion, {}, dict(knn_params or {})
  if "item_knn" in f.components:
    cooc = bl.ItemCooccurrence.from_data(data)
    grid = [{"k": int(k), "shrink": float(s)} for k in _seq(f.knn_k) for s in _seq(f.knn_shrink)]
    for d in implicit:
      if d in params:
        continue
      if len(grid) > 1 and data.mask(("valid",), d).any():
        params[d], _ = bl.tune(lambda **p: bl.ItemKNN(**p, cooccurrence=cooc), grid, data,
                               tuning_queries(data, d, config), bl.ranking_metric(data, d, "ndcg@10"))
      else:
        params[d] = grid[0]
    cf["item_knn"] = PerDomain({d: bl.ItemKNN(**params[d], cooccurrence=cooc).fit(data)
                                for d in implicit}, "item-kNN")
  if "ease" in f.components:
    cf["ease"] = bl.EASE(lam=f.ease_lambda, domains=implicit,
                         max_items=f.ease_max_items).fit(data)
  if "text_knn" in f.components and text is not None:
    cf["text_knn"] = bl.TextKNN(text, k=f.text_knn_k).fit(data)
  return cf, params


def tuning_queries(data: InteractionData, domain: int, config=None):
  """The domain's valid queries that tune the fusion and item-kNN: at most
  ``fusion.max_tuning_queries`` of them (a seeded sample; 0: all), so the tuning's cost is
  bounded by queries x catalog, not users x catalog."""
  valid = data.queries("valid", domain)
  limit = int(config.fusion.max_tuning_queries) if config is not None else 0
  if not limit or len(valid) <= limit:
    return valid
  keep = np.zeros(len(valid), bool)
  keep[np.random.default_rng([config.seed, domain]).choice(len(valid), limit, replace=False)] = True
  return valid.subset(keep)


def _seq(value) -> tuple:
  return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def tune_fusion(model: FittedHybrid, cf, data: InteractionData, config=None):
  """(weights, cold-item terms) per implicit domain, both tuned on valid: the weights first,
  then, with ``fusion.cold_item_terms``, the cold items' text boost and offset on top of them
  (``eval.cold_item_max_train`` says which items are cold)."""
  max_train = int(config.eval.cold_item_max_train) if config is not None else 2
  weights, cold, counts = {}, {}, None
  for d in range(len(data.domains)):
    if data.task(d) != "implicit" or not cf or not data.mask(("valid",), d).any():
      continue
    valid = tuning_queries(data, d, config)
    cols = slice(data.offsets[d], data.offsets[d + 1])
    parts = {n: m.score_catalog(valid, d) for n, m in cf.items()} | {
        NEURAL: model.score_catalog(valid, d)}
    target, exclude = valid.item - data.offsets[d], valid.context[:, cols]
    weights[d], _ = fusion.tune_weights(parts, target, exclude)
    if config is not None and config.fusion.cold_item_terms:
      counts = data.item_counts(("train",)) if counts is None else counts
      terms = fusion.tune_cold(parts, weights[d], target, exclude, counts[cols],
                               max_train=max_train)
      if terms is not None and terms.active:
        cold[d] = terms
  return weights, cold


def evaluate(model: ServedModel, data: InteractionData, split: str, config=None
             ) -> dict[str, dict[str, float]]:
  """Per domain: ours (fused where fused) next to the baseline rows, with the slices and
  protocols of ``evaluation.evaluate_model`` (``config.eval``; None: its defaults)."""
  from crossrec_jax import evaluation  # pylint: disable=import-outside-toplevel
  return evaluation.evaluate_model(model, data, split, config)


def evaluate_and_report(model: ServedModel, data: InteractionData, step: int, workdir,
                        label: str, config=None) -> dict[str, dict[str, float]]:
  """valid then test (where the data has them), each written to ``workdir``'s metrics and
  printed; returns the last one's metrics."""
  from crossrec_jax.evaluation import format_table  # pylint: disable=import-outside-toplevel
  results = {}
  with metric_writers.create_default_writer(workdir) as writer:
    for split in ("valid", "test"):
      if not data.mask((split,)).any():
        continue
      results = evaluate(model, data, split, config)
      writer.write_scalars(step, metric_writers.flatten(results, f"{split}/"))
      if jax.process_index() == 0:
        print(f"\n[{label}] {split} metrics (ours vs baseline):\n{format_table(results)}")
  return results


def network_evaluator(config, data: InteractionData, writer, fitted_of):
  """The loop's mid-run evaluation: the network alone (no fusion) on the eval split, written and
  printed; ``fitted_of(state)`` gives the network of a train state."""
  split = config.data.eval_split if data.mask((config.data.eval_split,)).any() else "test"

  def network_metrics(state, step):
    results = evaluate(ServedModel(fitted_of(state), {}, {}), data, split, config)
    writer.write_scalars(step, metric_writers.flatten(results, f"{split}/"))
    if jax.process_index() == 0:
      from crossrec_jax.evaluation import format_table  # pylint: disable=import-outside-toplevel
      print(f"\n[step {step}] {split} metrics of the network (ours vs baseline):\n"
            f"{format_table(results)}")
    return results

  return network_metrics


def report_fusion(model: ServedModel, data: InteractionData) -> None:
  if model.weights and jax.process_index() == 0:
    print("fusion weights (tuned on valid): " + ", ".join(
        f"{data.names[d]} {w}" for d, w in model.weights.items()))
  for d, c in model.cold.items():
    if jax.process_index() == 0:
      print(f"cold items of {data.names[d]} (<= {c.max_train} train interactions, "
            f"{int(c.columns.sum())} items): boost {c.boost}, offset {c.offset:g}")


def _inputs(config, workdir: epath.Path, secret=None):
  """The data, cached item text vectors, settings and checkpoint description of a run."""
  secret = secret or resolve_link_secret(config)
  builder = prepare_data(config, secret)
  if config.get("best_metric"):  # the data's domains are known now: before anything is written
    config_check.check_best_metric(config.best_metric, data_lib.metadata(builder)["domains"])
  data = InteractionData.from_builder(builder)
  # The encoder loads from a local directory (transformers / safetensors read local files only):
  # "generated:tiny" writes its checkpoint under the workdir, so it needs a local workdir; a
  # bucket workdir uses a local or hub checkpoint. The text cache itself may be in the bucket.
  text = text_cache.cached_vectors(str(resolve_model_checkpoint(config, workdir)), data.item_texts,
                                   config.data.item_max_length,
                                   cache_dir=config.text_cache or workdir / "text_cache")
  settings = HybridSettings.from_config(config, data)
  model_meta = {"encoder_mode": "frozen", "settings": dataclasses.asdict(settings),
                "domains": data.domains, "num_users": data.num_users, "num_items": data.num_items,
                "text_dim": int(text.shape[1])}
  meta = json.loads(json.dumps({"config": public_config_dict(config), "model": model_meta,
                                "link_secret": secret_description(secret)}, default=list))
  return data, text, settings, meta


def trainer_for(config, data, text, settings, mesh=None):
  """The hybrid trainer of a run: ``train_steps`` (> 0) overrides ``settings.epochs``."""
  mesh = mesh if mesh is not None else sharding.create_mesh(dict(config.mesh))
  return build_trainer(data, settings, text=text, mesh=mesh, rules=tuple(config.sharding_rules),
                       total_steps=int(config.train_steps))


def _restore(checkpointer, data, text, settings, meta, config=None):
  """(step, hybrid, (fusion weights, cold-item terms), item-kNN params) of the newest finished
  checkpoint (one with fusion weights), or None when there is none."""
  if not checkpointer.all_steps():
    return None
  trainer = (trainer_for(config, data, text, settings) if config is not None
             else build_trainer(data, settings, text=text))
  restored = checkpointer.restore(trainer.abstract_state().params, expected_meta=meta,
                                  params_only=True)
  if restored is None or "fusion_weights" not in restored[3]:
    return None
  step, params, _, saved = restored
  return (step, trainer.fitted(params), fusion_from_meta(saved, data),
          {int(d): p for d, p in saved.get("knn_params", {}).items()})


def load(workdir, config, secret=None) -> tuple[ServedModel, InteractionData, int]:
  """The served model of a run directory, exactly as its evaluation used it: the
  network from the newest checkpoint, the CF parts refitted on the same train split (they are
  deterministic functions of it) and the saved fusion weights."""
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  data, text, settings, meta = _inputs(config, workdir, secret)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    restored = _restore(checkpointer, data, text, settings, meta, config)
  finally:
    checkpointer.close()
  if restored is None:
    raise ckpt_lib.CheckpointIncompatibleError(
        f"{workdir}: no finished frozen-mode checkpoint to restore (train it to the end first)")
  step, hybrid, (weights, cold), knn = restored
  return ServedModel(hybrid, fit_cf(data, config, text, knn)[0], weights, cold), data, step


def train_and_evaluate(config, workdir, progress_marker=None) -> dict[str, Any]:
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  data, text, settings, meta = _inputs(config, workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  trainer = trainer_for(config, data, text, settings)
  checkpointer = ckpt_lib.Checkpointer.from_config(config, workdir / "checkpoints")
  batches = trainer.batches()
  try:
    restored = checkpointer.restore(trainer.abstract_state(), expected_meta=meta)
    weights = None
    if restored is not None:
      step, state, data_state, saved = restored
      if data_state:
        batches.set_state(data_state)
      weights = saved.get("fusion_weights")
      knn = {int(d): p for d, p in saved.get("knn_params", {}).items()}
      print(f"Restored the frozen-mode model from {checkpointer.directory}/{step}")
    else:
      step, state, knn = 0, trainer.init_state(), None
    if weights is None:  # not finished: train (on from the restored step)
      writer = metric_writers.create_default_writer(workdir)

      def mark(step):
        if progress_marker is not None:
          progress_marker.started = True

      try:
        result = loop.run_loop(
            loop.LoopSettings.from_config(config, trainer.total_steps), state, trainer.step,
            batches, start=step, checkpointer=checkpointer, meta=meta,
            evaluate=network_evaluator(config, data, writer,
                                       lambda state: trainer.fitted(state.params)),
            writer=writer, examples=lambda batch: batch[2], learning_rate=trainer.schedule,
            on_step=mark, show_progress=jax.process_index() == 0)
      finally:
        writer.close()
      if not result.finished:
        return {"step": result.step, "metrics": {}, "preempted": result.preempted}
      step, state = result.step, result.state
    hybrid = trainer.fitted(state.params)
    cf, knn = fit_cf(data, config, text, knn if weights is not None else None)
    if weights is None:
      model = ServedModel(hybrid, cf, *tune_fusion(hybrid, cf, data, config))
      if step in checkpointer.all_steps():  # an early stop saved this step without weights
        checkpointer.manager.delete(step)
      checkpointer.save(step, state, batches.get_state(), meta | model.fusion_meta() | {
          "knn_params": {str(d): p for d, p in knn.items()}})
    else:
      model = ServedModel(hybrid, cf, *fusion_from_meta(saved, data))
  finally:
    checkpointer.close()
  results = evaluate_and_report(model, data, step, workdir, "frozen", config)
  report_fusion(model, data)
  return {"step": step, "metrics": results, "model": model}
