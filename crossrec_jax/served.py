"""``config.encoder_mode = "frozen"``: the served model of a run (the default path).

prepare data (tfds) -> interaction log -> frozen-encoder item vectors, cached in
``workdir/text_cache`` (keyed by encoder weights, texts and max length, reused by later runs)
-> hybrid model (``training.hybrid``) -> item-item CF (kNN, EASE) fitted on the same train
split -> fusion weights tuned per implicit domain on valid -> Orbax checkpoint (params + the
settings, fusion weights and CF hyper-parameters as JSON) -> valid / test metrics next to the
popularity / item-mean baselines.

Re-running with a checkpoint present restores it instead of training again (CF parts are
refitted: they are deterministic functions of the train split).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from crossrec_jax import baselines as bl
from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import fusion, metric_writers, metrics, ranking, text_cache
from crossrec_jax.training.hybrid import FittedHybrid, HybridSettings, fit_hybrid
from crossrec_jax.data.from_config import (prepare_data, public_config_dict,
                                          resolve_link_secret, resolve_model_checkpoint,
                                          secret_description)
from crossrec_jax.interactions import InteractionData

NEURAL = "neural"


@dataclasses.dataclass
class ServedModel:
  """The served model: the hybrid network, CF components and per-domain fusion weights."""
  hybrid: FittedHybrid
  cf: dict[str, bl.Recommender]
  weights: dict[int, dict[str, float]]

  def score_catalog(self, queries, domain: int) -> np.ndarray:
    """Fused scores where the domain has weights (implicit domains), else the network's."""
    neural = self.hybrid.score_catalog(queries, domain)
    w = self.weights.get(domain)
    if not w:
      return neural
    parts = {NEURAL: neural} | {n: m.score_catalog(queries, domain) for n, m in self.cf.items()
                                if w.get(n)}
    return np.asarray(fusion.fuse(parts, w))

  def score_pairs(self, queries) -> np.ndarray:
    return self.hybrid.score_pairs(queries)


def fit_cf(data: InteractionData, config, text=None) -> dict[str, bl.Recommender]:
  """The fusion's non-network components; ``text``: the frozen encoder's item vectors, for the
  content-based text-kNN (the component that ranks items CF has not seen)."""
  implicit = [d for d in range(len(data.domains)) if data.task(d) == "implicit"]
  if not implicit:
    return {}
  cf = {}
  if "text_knn" in config.fusion.components and text is not None:
    cf["text_knn"] = bl.TextKNN(text, k=config.fusion.text_knn_k).fit(data)
  if "item_knn" in config.fusion.components:
    cf["item_knn"] = bl.ItemKNN(k=config.fusion.knn_k, shrink=config.fusion.knn_shrink).fit(data)
  if "ease" in config.fusion.components:
    cf["ease"] = bl.EASE(lam=config.fusion.ease_lambda, domains=implicit).fit(data)
  return cf


def tune_fusion(model: FittedHybrid, cf, data: InteractionData) -> dict[int, dict[str, float]]:
  weights = {}
  for d in range(len(data.domains)):
    if data.task(d) != "implicit" or not cf or not data.mask(("valid",), d).any():
      continue
    valid = data.queries("valid", d)
    cols = slice(data.offsets[d], data.offsets[d + 1])
    parts = {NEURAL: model.score_catalog(valid, d)} | {
        n: m.score_catalog(valid, d) for n, m in cf.items()}
    weights[d], _ = fusion.tune_weights(parts, valid.item - data.offsets[d], valid.context[:, cols])
  return weights


def evaluate(model: ServedModel, data: InteractionData, split: str, k: int = 10
             ) -> dict[str, dict[str, float]]:
  """Per domain: ours (fused where fused) next to popularity / item-mean on the same targets."""
  results = {}
  popularity = data.item_counts()
  item_mean = None
  for d, spec in enumerate(data.domains):
    if not data.mask((split,), d).any():
      continue
    if spec["task"] == "rating":
      q = data.queries(split, d, context=model.hybrid.context)
      lo, hi = spec["min_rating"], spec["max_rating"]
      pred = np.clip(model.score_pairs(q), lo, hi)
      item_mean = item_mean or bl.ItemMean().fit(data)
      base = item_mean.score_pairs(q)
      results[spec["name"]] = {"n": len(q), "rmse": metrics.rmse(pred, q.label),
                               "mae": metrics.mae(pred, q.label),
                               "baseline_rmse": metrics.rmse(base, q.label),
                               "baseline_mae": metrics.mae(base, q.label)}
    else:
      q = data.queries(split, d)
      cols = slice(data.offsets[d], data.offsets[d + 1])
      ours = ranking.ranking_metrics(model.score_catalog(q, d), q.item - data.offsets[d],
                                     q.context[:, cols], k)
      pop = ranking.ranking_metrics(np.broadcast_to(popularity[cols], (len(q), cols.stop - cols.start)),
                                    q.item - data.offsets[d], q.context[:, cols], k)
      results[spec["name"]] = ours | {f"baseline_{m}": v for m, v in pop.items() if m != "n"}
  return results


def evaluate_and_report(model: ServedModel, data: InteractionData, step: int, workdir,
                        label: str) -> dict[str, dict[str, float]]:
  """valid then test (where the data has them), each written to ``workdir``'s metrics and
  printed; returns the last one's metrics."""
  from crossrec_jax.evaluation import format_table  # pylint: disable=import-outside-toplevel
  results = {}
  with metric_writers.create_default_writer(workdir) as writer:
    for split in ("valid", "test"):
      if not data.mask((split,)).any():
        continue
      results = evaluate(model, data, split)
      writer.write_scalars(step, metric_writers.flatten(results, f"{split}/"))
      if jax.process_index() == 0:
        print(f"\n[{label}] {split} metrics (ours vs baseline):\n{format_table(results)}")
  return results


def _inputs(config, workdir: epath.Path, secret=None):
  """The data, cached item text vectors, settings and checkpoint description of a run."""
  secret = secret or resolve_link_secret(config)
  data = InteractionData.from_builder(prepare_data(config, secret))
  # The encoder loads from a local directory (transformers / safetensors read local files only):
  # "generated:tiny" writes its checkpoint under the workdir, so it needs a local workdir; a
  # bucket workdir uses a local or hub checkpoint. The text cache itself may be in the bucket.
  text = text_cache.cached_vectors(str(resolve_model_checkpoint(config, workdir)), data.item_texts,
                                   config.data.item_max_length, cache_dir=workdir / "text_cache")
  settings = HybridSettings.from_config(config, data)
  model_meta = {"encoder_mode": "frozen", "settings": dataclasses.asdict(settings),
                "domains": data.domains, "num_users": data.num_users, "num_items": data.num_items,
                "text_dim": int(text.shape[1])}
  meta = json.loads(json.dumps({"config": public_config_dict(config), "model": model_meta,
                                "link_secret": secret_description(secret)}, default=list))
  return data, text, settings, meta


def _restore(checkpointer, data, text, settings, meta):
  """(step, hybrid, fusion weights) of the newest checkpoint, or None when there is none."""
  if not checkpointer.all_steps():
    return None
  # The untrained model gives the checkpoint's structure; epochs=0 trains nothing.
  hybrid = fit_hybrid(data, dataclasses.replace(settings, epochs=0), text=text, verbose=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(nnx.split(hybrid.model)[1]))
  restored = checkpointer.restore(abstract, expected_meta=meta, params_only=True)
  if restored is None:
    return None
  step, params, _, saved = restored
  nnx.update(hybrid.model, params)
  hybrid.refresh()
  return step, hybrid, {int(d): w for d, w in saved["fusion_weights"].items()}


def load(workdir, config, secret=None) -> tuple[ServedModel, InteractionData, int]:
  """The served model of a run directory, exactly as its evaluation used it: the
  network from the newest checkpoint, the CF parts refitted on the same train split (they are
  deterministic functions of it) and the saved fusion weights."""
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  data, text, settings, meta = _inputs(config, workdir, secret)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    restored = _restore(checkpointer, data, text, settings, meta)
  finally:
    checkpointer.close()
  if restored is None:
    raise ckpt_lib.CheckpointIncompatibleError(f"{workdir}: no frozen-mode checkpoint to restore")
  step, hybrid, weights = restored
  return ServedModel(hybrid, fit_cf(data, config, text), weights), data, step


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  workdir = epath.Path(workdir)  # gs://bucket/run stays intact (pathlib: gs:/bucket/run)
  workdir.mkdir(parents=True, exist_ok=True)
  data, text, settings, meta = _inputs(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1, async_save=False)
  try:
    restored = _restore(checkpointer, data, text, settings, meta)
    if restored is not None:
      step, hybrid, weights = restored
      print(f"Restored the frozen-mode model from {checkpointer.directory}/{step}")
    else:
      hybrid = fit_hybrid(data, settings, text=text, verbose=True)
    cf = fit_cf(data, config, text)
    if restored is None:
      weights = tune_fusion(hybrid, cf, data)
      step = settings.epochs
      checkpointer.save(step, {"params": nnx.to_pure_dict(nnx.split(hybrid.model)[1])}, None,
                        meta | {"fusion_weights": {str(d): w for d, w in weights.items()}})
  finally:
    checkpointer.close()
  model = ServedModel(hybrid, cf, weights)
  results = evaluate_and_report(model, data, step, workdir, "frozen")
  if weights:
    print("fusion weights (tuned on valid): " + ", ".join(
        f"{data.names[d]} {w}" for d, w in weights.items()))
  return {"step": step, "metrics": results}
