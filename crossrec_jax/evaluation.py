"""Per-domain evaluation: RMSE / MAE for explicit domains, full-catalog AUC / HR@K / NDCG@K for
implicit domains (the user's earlier items of the domain excluded), a cold-user slice, and the
popularity baselines measured on the same examples.

Used by training (periodic evaluation) and by ``crossrec_jax.evaluate`` (the CLI over a run).
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import jax
import numpy as np

from crossrec_jax import metrics as metrics_lib
from crossrec_jax import sharding
from crossrec_jax.training import steps
from crossrec_jax.data import pipeline


class Evaluator:
  """Encodes the catalog once per call, then scores every eval example against it."""

  def __init__(self, graphdef, mesh, catalog: pipeline.Catalog, tokenizer, pipe_config,
               model_config, *, k: int = 10, batch_size: int | None = None):
    self.mesh, self.catalog, self.tokenizer = mesh, catalog, tokenizer
    self.pipe_config, self.model_config, self.k = pipe_config, model_config, k
    n_dev = mesh.devices.size
    self.batch_size = max(n_dev, ((batch_size or pipe_config.batch_size) // n_dev) * n_dev)
    _, encode_items, predict, project_items, project_users = steps.make_encode_fns(graphdef)
    rep = sharding.replicated(mesh)
    self._encode_items = jax.jit(encode_items, out_shardings=rep)
    self._predict = jax.jit(predict, out_shardings=rep)
    self._project_items = jax.jit(project_items, out_shardings=rep)
    self._project_users = jax.jit(project_users, out_shardings=rep)

  def item_vectors(self, params) -> np.ndarray:
    c, b = self.catalog, self.batch_size
    out = []
    for start in range(0, len(c), b):
      rows = np.arange(start, min(start + b, len(c)))
      padded = np.concatenate([rows, np.full(b - len(rows), rows[-1])])
      arrays = sharding.global_from_full_batch(
          {"ids": c.input_ids[padded], "mask": c.attention_mask[padded], "bucket": c.bucket[padded]},
          self.mesh)
      vec = self._encode_items(params, arrays["ids"], arrays["mask"], arrays["bucket"])
      out.append(sharding.to_host(vec)[:len(rows)])
    return np.concatenate(out)

  def predictions(self, params, source, limit=None):
    """Per-example predictions and the records they belong to."""
    preds, records = collections.defaultdict(list), []
    for batch, recs in pipeline.eval_batches(source, self.catalog, self.tokenizer, self.pipe_config,
                                             batch_size=self.batch_size, limit=limit):
      out = self._predict(params, sharding.global_from_full_batch(batch, self.mesh))
      n = len(recs)
      for key in ("rating", "logit", "user"):
        preds[key].append(sharding.to_host(out[key])[:n])
      preds["item_row"].append(batch["item_row"][:n])
      records.extend(recs)
    return {k: np.concatenate(v) for k, v in preds.items()}, records

  def evaluate(self, params, source, *, limit=None, baselines: "Baselines | None" = None
               ) -> dict[str, dict[str, float]]:
    preds, records = self.predictions(params, source, limit)
    item_vecs = None
    results = {}
    domain_of = np.array([r["domain_index"] for r in records])
    cold = np.array([bool(r["cold"]) for r in records])
    labels = np.array([r["label"] for r in records], np.float64)
    for d, spec in enumerate(self.model_config.domains):
      idx = np.flatnonzero(domain_of == d)
      if not len(idx):
        continue
      for slice_name, sel in (("", idx), ("/cold", idx[cold[idx]])):
        if not len(sel):
          continue
        name = spec.name + slice_name
        if spec.task == "rating":
          results[name] = {"rmse": metrics_lib.rmse(preds["rating"][sel], labels[sel]),
                           "mae": metrics_lib.mae(preds["rating"][sel], labels[sel]), "n": len(sel)}
          if baselines is not None:
            base = baselines.item_mean([records[i] for i in sel])
            results[name] |= {"baseline_rmse": metrics_lib.rmse(base, labels[sel]),
                              "baseline_mae": metrics_lib.mae(base, labels[sel])}
        else:
          if item_vecs is None:
            item_vecs = self.item_vectors(params)
          scores = self._domain_scores(params, d, preds["user"][sel], item_vecs)
          ranked = self._ranking(scores, d, [records[i] for i in sel], preds["item_row"][sel])
          results[name] = ranked | {"n": len(sel)}
          if baselines is not None:
            pop = np.broadcast_to(baselines.popularity[self.catalog.rows_of_domain[d]], scores.shape)
            base = self._ranking(pop, d, [records[i] for i in sel], preds["item_row"][sel])
            results[name] |= {f"baseline_{k}": v for k, v in base.items()}
    return results

  def _domain_scores(self, params, d, users, item_vecs):
    rows = self.catalog.rows_of_domain[d]
    item_proj = sharding.to_host(self._project_items(params, item_vecs[rows]))[:, d]   # [N_d, R]
    user_proj = sharding.to_host(self._project_users(params, users))[:, d]            # [n, R]
    return user_proj @ item_proj.T

  def _ranking(self, scores, d, records, item_rows):
    rows = self.catalog.rows_of_domain[d]
    position = {int(r): i for i, r in enumerate(rows)}
    target = np.array([position[int(r)] for r in item_rows])
    exclude = np.zeros(scores.shape, bool)
    domain = self.model_config.domains[d].name
    for i, rec in enumerate(records):
      for h in rec.get("history_items", ()):
        row = self.catalog.row.get((domain, h))
        if row is not None:
          exclude[i, position[row]] = True
    rank, candidates = metrics_lib.rank_of_target(scores, target, exclude)
    return metrics_lib.ranking_metrics(rank, candidates, self.k)


class Baselines:
  """Item-mean ratings (explicit) and item popularity (implicit) from the train split."""

  def __init__(self, catalog: pipeline.Catalog, counts: np.ndarray, label_sums: np.ndarray):
    """``counts`` / ``label_sums``: train interactions and their label sum per catalog row."""
    self.catalog = catalog
    self.domain_mean = np.zeros(len(catalog.domains))
    for d, rows in enumerate(catalog.rows_of_domain):
      self.domain_mean[d] = label_sums[rows].sum() / max(counts[rows].sum(), 1)
    self.mean = np.where(counts > 0, label_sums / np.maximum(counts, 1),
                         self.domain_mean[catalog.domain])
    self.popularity = counts

  def item_mean(self, records: Sequence[dict[str, Any]]) -> np.ndarray:
    return np.array([self.mean[self.catalog.row[(r["domain"], r["item_id"])]] for r in records])


def format_table(results: dict[str, dict[str, float]]) -> str:
  lines = []
  for name, m in results.items():
    if "rmse" in m:
      lines.append(f"  {name:<16} n={m['n']:<6} RMSE {m['rmse']:.4f} (item-mean {m.get('baseline_rmse', float('nan')):.4f})"
                   f"  MAE {m['mae']:.4f} (item-mean {m.get('baseline_mae', float('nan')):.4f})")
    else:
      hr = next(k for k in m if k.startswith("hr@"))
      ndcg = hr.replace("hr", "ndcg")
      lines.append(f"  {name:<16} n={m['n']:<6} {hr.upper()} {m[hr]:.4f} (popularity {m.get('baseline_' + hr, float('nan')):.4f})"
                   f"  {ndcg.upper()} {m[ndcg]:.4f} (popularity {m.get('baseline_' + ndcg, float('nan')):.4f})"
                   f"  AUC {m['auc']:.4f} (popularity {m.get('baseline_auc', float('nan')):.4f})")
  return "\n".join(lines)
