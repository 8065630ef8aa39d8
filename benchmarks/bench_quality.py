"""Recommendation quality on real data: our model against the strongest classical models, same
split, same run.

python benchmarks/bench_quality.py --data ../shared/data/ml-100k             # explicit: RMSE / MAE
python benchmarks/bench_quality.py --data ../shared/data/amazon-arts-office  # implicit: HR / NDCG
python benchmarks/bench_quality.py --data DIR --json results.json           # every row as JSON
python benchmarks/bench_quality.py --data DIR --config.hybrid.dim=128     # our model, changed

Any directory in the bring-your-own layout (interactions + items tables) or with MovieLens native
files works unchanged. Everything runs through the library: the prepared data set
(``InteractionData``), the frozen-encoder text vectors (``text_cache``, cached across runs), the
classical models (``crossrec_jax.baselines``), our stage-1 hybrid model (``cached_training``)
and CF + deep fusion (``fusion``).

Explicit (rating) domains: global mean, item mean, user+item bias, biased MF (ALS) and
I-AutoRec, tuned on a held-out slice of train (or the valid split), against our hybrid model,
its ablations, and the ensemble (mean of our model and AutoRec). Implicit domains: each target
ranked among all items of its domain with the user's earlier items of that domain excluded,
ties counting half: popularity, item-kNN (k and shrinkage tuned per domain on valid), EASE, BPR,
text-kNN (content-based item-kNN on the frozen text vectors), our model alone and its ablations,
the CF fusion without the neural part, CF + text-kNN without the network, and the served fusion
of all of them (weights tuned per domain on valid). Every method also gets a cold-item slice: targets whose
item has at most 2 train interactions. Test is touched once per method.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import sys
import tempfile
import time
import types

import jax
import ml_collections
import numpy as np
import scipy.sparse as sp

from crossrec_jax import cli, errors
from crossrec_jax import baselines as bl
from crossrec_jax import config_defaults, evaluation, fusion, metrics, text_cache, train
from crossrec_jax.data import from_config
from crossrec_jax.training.hybrid import fit_hybrid
from crossrec_jax.training.inputs import HybridSettings
from crossrec_jax.interactions import InteractionData, Queries

COLD_ITEM_MAX_TRAIN = 2  # a target whose item has at most this many train interactions is "cold"
TEXT_KNN = "text-kNN (content)"
CF_FUSION = "CF fusion: item-kNN + EASE (no neural part)"
TEXT_FUSION = "CF + text fusion: item-kNN + EASE + text-kNN (no network)"
SERVED = "ours, served: item-kNN + EASE + text-kNN + neural (fused)"


# ------------------------------------------------------------------------------------------------
# Results: one row per (method, domain, metric), printed as tables and written as JSON.

@dataclasses.dataclass
class Results:
  rows: list[dict] = dataclasses.field(default_factory=list)
  paired: list[dict] = dataclasses.field(default_factory=list)  # served vs baselines, per target

  def add(self, method: str, domain: str, values: dict[str, float], ours: bool = False,
          slice_name: str = ""):
    for metric, value in values.items():
      if metric in ("n",):
        continue
      row = {"method": method, "domain": domain, "metric": metric.lower(), "value": float(value),
             "ours": ours}
      if slice_name:
        row["slice"] = slice_name
      self.rows.append(row)

  def value(self, method, domain, metric, slice_name=""):
    for r in self.rows:
      if (r["method"], r["domain"], r["metric"], r.get("slice", "")) == (method, domain, metric,
                                                                          slice_name):
        return r["value"]
    return None


def _timed(label):
  class _Timer:
    def __enter__(self):
      self.t = time.time()
      return self

    def __exit__(self, *exc):
      print(f"  {label}: {time.time() - self.t:.0f}s", flush=True)
  return _Timer()


# ------------------------------------------------------------------------------------------------
# Explicit domains.

def rating_section(data: InteractionData, text, args, results: Results, names, base=None,
                   served_model=None):
  explicit = [d for d in range(len(data.domains)) if data.task(d) == "rating"]
  if not explicit:
    return
  has_valid = np.any(data.split == "valid")
  tuning = data if has_valid else bl.holdout_split(data, 0.1, args.seed)
  counts = data.item_counts()
  predictions = {}  # method -> [n_test] over all explicit test targets
  queries = {d: data.queries("test", d, context="all") for d in explicit}
  valid = {d: tuning.queries("valid", d, context="all") for d in explicit}

  def add(method, model, ours=False):
    predictions[method] = {d: np.asarray(model.score_pairs(queries[d]), np.float64) for d in explicit}
    predictions[method]["ours"] = ours

  class GlobalMean(bl.RatingRecommender):
    name = "global mean"

    def _fit_domain(self, user, col, rating, num_users, num_items):
      return bl.RatingTerms(float(rating.mean()), np.zeros(num_users), np.zeros(num_items))

  add("global mean", GlobalMean().fit(data))
  add("item mean", bl.ItemMean().fit(data))
  for label, make, grid in (
      ("user+item bias", bl.UserItemBias, [{"reg": g} for g in args.bias_regs]),
      ("biased MF (ALS)", lambda **p: bl.BiasedMF(seed=args.seed, **p),
       [{"rank": k, "reg": g} for k in args.mf_ranks for g in args.mf_regs])):
    with _timed(label):
      best, tried = bl.tune(make, grid, tuning, _concat(valid), bl.rmse_metric, mode="min")
      print(f"    tuned on {sum(len(v) for v in valid.values())} held-out ratings: " +
            ", ".join(f"{p} -> {v:.4f}" for p, v in tried), flush=True)
      add(label, make(**best).fit(data))
  with _timed("I-AutoRec"):
    add("I-AutoRec", bl.AutoRec(seed=args.seed).fit(data))

  if not args.skip_model:
    # Ours: the run train_and_evaluate trained (the train CLI's model); ablations refit.
    add("ours (hybrid: text + ID + history)", served_model.hybrid, ours=True)
    variants = {}
    if not args.no_ablations:
      variants |= {
          "ours without text": dataclasses.replace(base, use_text=False, use_history_text=False),
          "ours without implicit term": dataclasses.replace(base, use_history=False),
          "ours without biases": dataclasses.replace(base, use_biases=False),
          ("ours with APR" if base.adversarial == "none" else "ours without APR"):
              dataclasses.replace(base, adversarial="apr" if base.adversarial == "none" else "none"),
      }
    for label, settings in variants.items():
      with _timed(label):
        add(label, fit_hybrid(data, settings, text=text, verbose=args.verbose), ours=True)
    ensemble = {d: np.mean([predictions["ours (hybrid: text + ID + history)"][d],
                            predictions["I-AutoRec"][d]], 0) for d in explicit}
    predictions["ours, ensemble (hybrid + I-AutoRec, mean)"] = ensemble | {"ours": True}

  for d in explicit:
    lo, hi = data.domains[d]["min_rating"], data.domains[d]["max_rating"]
    q = queries[d]
    cold = counts[q.item] <= COLD_ITEM_MAX_TRAIN
    for method, per in predictions.items():
      pred = np.clip(per[d], lo, hi)
      results.add(method, names[d], {"rmse": metrics.rmse(pred, q.label),
                                     "mae": metrics.mae(pred, q.label)}, per["ours"])
      if cold.any():
        results.add(method, names[d], {"rmse": metrics.rmse(pred[cold], q.label[cold]),
                                       "mae": metrics.mae(pred[cold], q.label[cold])},
                    per["ours"], "cold items")
  print_rating_tables(results, [names[d] for d in explicit], queries, counts)


def _concat(per_domain):
  qs = list(per_domain.values())
  return Queries(*(np.concatenate([getattr(q, f) for q in qs]) for f in
                   ("user", "domain", "item", "label")),
                 sp.vstack([q.context for q in qs]).tocsr(), np.concatenate([q.row for q in qs]))


def print_rating_tables(results: Results, domains, queries, counts):
  methods = list(dict.fromkeys(r["method"] for r in results.rows if r["metric"] == "rmse"))
  for d, name in enumerate(domains):
    q = next(iter(queries.values())) if len(queries) == 1 else list(queries.values())[d]
    n_cold = int(np.sum(counts[q.item] <= COLD_ITEM_MAX_TRAIN))
    print(f"\n{name} (explicit; test ratings n={len(q)}, cold items n={n_cold})")
    print(f"  {'method':<44} {'RMSE':>7} {'MAE':>7}   {'cold RMSE':>9}")
    for m in methods:
      rmse, mae = results.value(m, name, "rmse"), results.value(m, name, "mae")
      cold = results.value(m, name, "rmse", "cold items")
      if rmse is not None:
        print(f"  {m:<44} {rmse:7.4f} {mae:7.4f}   {cold if cold is not None else float('nan'):9.4f}")


# ------------------------------------------------------------------------------------------------
# Implicit domains.

def ranking_section(data: InteractionData, text, args, results: Results, names, base=None,
                    served_model=None):
  implicit = [d for d in range(len(data.domains)) if data.task(d) == "implicit"]
  if not implicit:
    return
  k = args.k
  counts = data.item_counts()
  test = {d: data.queries("test", d) for d in implicit}
  has_valid = all(np.any(data.mask(("valid",), d)) for d in implicit)
  valid = {d: data.queries("valid", d) for d in implicit} if has_valid else None
  scores_test, scores_valid = {}, {}   # method -> domain -> [n, N_d]

  def add(method, model, ours=False, need_valid=False):
    scores_test[method] = {d: model.score_catalog(test[d], d) for d in implicit} | {"ours": ours}
    if need_valid and valid is not None:
      scores_valid[method] = {d: model.score_catalog(valid[d], d) for d in implicit}

  add("popularity", bl.Popularity().fit(data))
  cf = served_model.cf if served_model is not None else {}  # the served run's own components
  with _timed("item-kNN (tuned per domain on valid)"):
    if "item_knn" in cf:
      knn = cf["item_knn"].models
    else:
      cooc = bl.ItemCooccurrence.from_data(data)
      grid = [{"k": kk, "shrink": s} for kk in args.knn_k for s in args.knn_shrink]
      knn = {}
      for d in implicit:
        best = {"k": 100, "shrink": 20.0}
        if valid is not None:
          best, _ = bl.tune(lambda **p: bl.ItemKNN(**p, cooccurrence=cooc), grid, data, valid[d],
                            bl.ranking_metric(data, d, f"ndcg@{k}"))
        knn[d] = bl.ItemKNN(**best, cooccurrence=cooc).fit(data)
    for d in implicit:
      print(f"    {names[d]}: k {knn[d].k}, shrink {knn[d].shrink}", flush=True)
    scores_test["item-kNN"] = {d: knn[d].score_catalog(test[d], d) for d in implicit} | {"ours": False}
    if valid is not None:
      scores_valid["item-kNN"] = {d: knn[d].score_catalog(valid[d], d) for d in implicit}
  with _timed(f"EASE (lambda {args.ease_lambda:g})"):
    add("EASE", cf.get("ease") or bl.EASE(lam=args.ease_lambda, domains=implicit).fit(data),
        need_valid=True)
  with _timed("BPR (ID only)"):
    add("BPR (ID only)", bl.BPR(seed=args.seed).fit(data))
  if text is not None:
    with _timed("text-kNN (content-based, frozen text vectors)"):
      add(TEXT_KNN, cf.get("text_knn") or bl.TextKNN(text, k=args.text_knn_k).fit(data),
          need_valid=True)

  if not args.skip_model:
    neural = "ours, neural alone (text + ID + history)"
    add(neural, served_model.hybrid, ours=True)
    # The served model exactly as train_and_evaluate fused it (item-kNN tuned on valid, EASE,
    # text-kNN, the network; weights tuned on valid): the train CLI's figures.
    scores_test[SERVED] = {d: served_model.score_catalog(test[d], d) for d in implicit} | {
        "ours": True}
    variants = {}
    if not args.no_ablations:
      variants |= {
          "ours, text only": (dataclasses.replace(base, use_ids=False, use_history=False), None),
          "ours, ID only": (dataclasses.replace(base, use_text=False, use_history_text=False), None),
          "ours, target-domain history only": (dataclasses.replace(base, cross_domain=False), None),
      }
      if args.adversarial_ablation:
        variants[("ours, with APR" if base.adversarial == "none" else "ours, without APR")] = (
            dataclasses.replace(base, adversarial="apr" if base.adversarial == "none" else "none"),
            None)
      if len(implicit) > 1:
        variants["ours, single-domain training"] = (base, "single")
    for label, (settings, mode) in variants.items():
      with _timed(label):
        if mode == "single":  # one model per domain, each trained on its own domain's rows only
          per = {}
          for d in implicit:
            single = data.only_domain(d)
            model = fit_hybrid(single, settings, text=text, verbose=args.verbose)
            per[d] = model.score_catalog(single.queries("test", d), d)
          scores_test[label] = per | {"ours": True}
        else:
          model = fit_hybrid(data, settings, text=text, verbose=args.verbose)
          add(label, model, ours=True)

  if valid is not None:
    fusions = {CF_FUSION: ["item-kNN", "EASE"]}
    if not args.skip_model:
      fusions[TEXT_FUSION] = ["item-kNN", "EASE", TEXT_KNN]
    for label, parts in fusions.items():
      per = {"ours": label.startswith("ours")}
      for d in implicit:
        cols = slice(data.offsets[d], data.offsets[d + 1])
        weights, _ = fusion.tune_weights({p: scores_valid[p][d] for p in parts},
                                         valid[d].item - data.offsets[d], valid[d].context[:, cols],
                                         k=k)
        print(f"  {label} {names[d]}: weights tuned on valid {weights}", flush=True)
        per[d] = np.asarray(fusion.fuse({p: scores_test[p][d] for p in parts}, weights))
      scores_test[label] = per
    if SERVED in scores_test:  # listed last, as before
      scores_test[SERVED] = scores_test.pop(SERVED)

  # Both protocols through the library's evaluator: the full catalog, and (for comparison with
  # papers) each target against --sampled_negatives negatives, drawn once for every method.
  negatives = {d: evaluation.sample_negatives(data, test[d], d, args.sampled_negatives, args.seed)
               for d in implicit} if args.sampled_negatives else {}
  protocols = {"full": ""} | ({"sampled": f"sampled {args.sampled_negatives}"} if negatives else {})
  all_ranks = {}
  for method, per in scores_test.items():
    ranks = []
    for d in implicit:
      cols = slice(data.offsets[d], data.offsets[d + 1])
      ranked = evaluation.rank_scores(per[d], test[d].item - data.offsets[d],
                                      test[d].context[:, cols], negatives.get(d))
      ranks.append((ranked, counts[test[d].item] <= COLD_ITEM_MAX_TRAIN))
    every = ({p: tuple(np.concatenate([r[p][i] for r, _ in ranks]) for i in range(2))
              for p in protocols}, np.concatenate([cold for _, cold in ranks]))
    for domain, (ranked, cold) in zip([names[d] for d in implicit] + ["all"], ranks + [every]):
      for protocol, slice_name in protocols.items():
        rank, cand = ranked[protocol]
        results.add(method, domain, _metrics(rank, cand, k), per["ours"], slice_name)
        if cold.any():
          results.add(method, domain, _metrics(rank[cold], cand[cold], k), per["ours"],
                      ", ".join(filter(None, (slice_name, "cold items"))))
    all_ranks[method] = every[0]["full"][0]
  for slice_name in protocols.values():
    print_ranking_table(results, [names[d] for d in implicit], test, counts, k, slice_name)
  served = SERVED
  if served in all_ranks:
    print(f"\n  paired differences over all {len(all_ranks[served])} targets, full catalog "
          "(mean +- standard error):")
    for other in ("item-kNN", "EASE", CF_FUSION, TEXT_FUSION):
      cells = []
      for name, a, b in zip((f"HR@{k}", f"NDCG@{k}"), metrics.per_target_hits(all_ranks[served], k),
                            metrics.per_target_hits(all_ranks[other], k)):
        mean, se = metrics.paired_difference(a, b)
        results.paired.append({"method": served, "versus": other, "metric": name.lower(),
                               "difference": mean, "standard_error": se})
        cells.append(f"{name} {mean:+.4f} +- {se:.4f}")
      print(f"  served - {other:<58} " + ", ".join(cells))


def _metrics(rank, cand, k):
  m = metrics.ranking_metrics(rank, cand, k)
  return {f"hr@{k}": m[f"hr@{k}"], f"ndcg@{k}": m[f"ndcg@{k}"]}


def print_ranking_table(results: Results, domains, test, counts, k, slice_name=""):
  """One protocol's table: the full catalog (``slice_name`` "") or "sampled N"."""
  methods = list(dict.fromkeys(r["method"] for r in results.rows if r["metric"] == f"hr@{k}"))
  n = {name: len(q) for name, q in zip(domains, test.values())}
  n_cold = sum(int(np.sum(counts[q.item] <= COLD_ITEM_MAX_TRAIN)) for q in test.values())
  protocol = ("full-catalog ranking, earlier items excluded" if not slice_name else
              f"{slice_name.split()[1]} sampled negatives per target, uniform over its domain "
              "without the user's items")
  cold_name = ", ".join(filter(None, (slice_name, "cold items")))
  print(f"\nimplicit domains ({protocol}; test n = " +
        ", ".join(f"{d} {n[d]}" for d in domains) + f"; cold-item targets {n_cold})")
  head = "".join(f" {d[:8] + ' HR@' + str(k):>14} {'NDCG':>7}" for d in domains)
  print(f"  {'method':<58}{head} {'all HR@' + str(k):>11} {'NDCG':>7}  {'cold HR':>7} {'NDCG':>7}")
  nan = float("nan")
  for m in methods:
    cells = ""
    for d in domains + ["all"]:
      hr, nd = (results.value(m, d, f"{x}@{k}", slice_name) for x in ("hr", "ndcg"))
      cells += f" {hr:14.4f} {nd:7.4f}" if d != "all" else f" {hr:11.4f} {nd:7.4f}"
    hr, nd = (results.value(m, "all", f"{x}@{k}", cold_name) for x in ("hr", "ndcg"))
    cells += f"  {hr if hr is not None else nan:7.4f} {nd if nd is not None else nan:7.4f}"
    print(f"  {m:<58}{cells}")


# ------------------------------------------------------------------------------------------------

def data_config(args, data_path: pathlib.Path, source: str):
  c = config_defaults.base_config()
  c.seed = args.seed
  c.data.source = source
  c.data.path = str(data_path)
  c.data.data_dir = args.data_dir
  c.hybrid.update(args.hybrid)  # our model's settings: HybridSettings.from_config, as in training
  c.encoder_mode = "frozen"
  c.model.checkpoint = args.model
  c.data.item_max_length = args.item_max_length
  c.text_cache = args.text_cache or str(text_cache.DEFAULT_CACHE_DIR)
  c.fusion.knn_k, c.fusion.knn_shrink = tuple(args.knn_k), tuple(args.knn_shrink)
  c.fusion.ease_lambda, c.fusion.text_knn_k = args.ease_lambda, args.text_knn_k
  c.eval_every = c.checkpoint_every = 0
  if source == "movielens":
    c.data.split = "ratio"
    c.data.ratio = tuple(args.ratio)
  return c


def detect_source(path: pathlib.Path) -> str:
  if (path / "u.data").exists() or (path / "ratings.dat").exists():
    return "movielens"
  return "byo"


def model_config() -> ml_collections.ConfigDict:
  """``--config.hybrid.FIELD=VALUE``: any field of our model's ``HybridSettings``; those left
  None keep the measured defaults for the data's kind."""
  types_ = {"int": int, "float": float, "bool": bool, "str": str}
  return ml_collections.ConfigDict({"hybrid": {
      f.name: ml_collections.config_dict.placeholder(types_.get(f.type, str))  # str | bool: str
      for f in dataclasses.fields(HybridSettings)}})


def _define_flags(fv, argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  numbers = lambda name, default, kind, text: cli.define_number_list(name, default, kind, text, fv)  # noqa: E731
  flags.DEFINE_string("data", None, "MovieLens or bring-your-own data directory.", **d)
  flags.DEFINE_string("data_dir", "", "Where the prepared tfds data set is cached.", **d)
  flags.DEFINE_string("json", "", "Write every table row to this file.", **d)
  flags.DEFINE_string("workdir", "", "Run directory of our model (default: a new temp folder).", **d)
  flags.DEFINE_integer("seed", 0, "Seed of the split and of every model.", **d)
  numbers("ratio", (0.8, 0.0, 0.2), float, "train,valid,test split of MovieLens (random, seeded)")
  flags.DEFINE_integer("k", 10, "Cutoff of HR@k / NDCG@k.", **d)
  flags.DEFINE_integer("sampled_negatives", 999, "Implicit domains: also rank each target against "
                       "this many sampled negatives of its domain (0: full catalog only).", **d)
  flags.DEFINE_string("model", "embedded:all-MiniLM-L6-v2", "Frozen text encoder.", **d)
  flags.DEFINE_integer("item_max_length", 32, "Tokens per item text.", **d)
  flags.DEFINE_string("text_cache", "", f"Default {text_cache.DEFAULT_CACHE_DIR}.", **d)
  flags.DEFINE_bool("skip_model", False, "Classical models only.", **d)
  flags.DEFINE_bool("no_ablations", False, "Our full model only.", **d)
  flags.DEFINE_bool("adversarial_ablation", False, "Also the APR on/off row for implicit domains "
                    "(explicit ones always get it).", **d)
  config_flags.DEFINE_config_dict("config", model_config(), "Our model: --config.hybrid.dim=128 "
                                  "sets a field of HybridSettings.", sys_argv=argv, **d)
  numbers("bias_regs", (2.0, 5.0, 10.0), float, "User+item bias penalties tried.")
  numbers("mf_ranks", (20, 50), int, "Biased MF ranks tried.")
  numbers("mf_regs", (0.1, 0.15, 0.2), float, "Biased MF penalties tried.")
  numbers("knn_k", (20, 50, 100, 200), int, "Item-kNN neighbour counts tried.")
  numbers("knn_shrink", (0.0, 10.0, 20.0, 50.0), float, "Item-kNN shrinkages tried.")
  flags.DEFINE_integer("text_knn_k", 50, "Neighbours per item of text-kNN.", **d)
  flags.DEFINE_float("ease_lambda", 30.0, "Best of {10, 30, 100, 300} on Amazon Arts x Office "
                     "valid.", **d)
  flags.mark_flags_as_required(["data"], flag_values=fv)


def parse_args(argv) -> types.SimpleNamespace:
  """The flags of ``argv`` (without the program name); ``hybrid``: the HybridSettings fields
  set with ``--config.hybrid.FIELD=VALUE``."""
  fv = cli.parse_flags(["bench_quality.py", *argv], _define_flags,
                       config_doc="HybridSettings in crossrec_jax/training/inputs.py")
  hybrid = {k: v for k, v in fv.config.hybrid.items() if v is not None}
  if isinstance(hybrid.get("use_user_ids"), str) and hybrid["use_user_ids"].lower() in ("true",
                                                                                        "false"):
    hybrid["use_user_ids"] = hybrid["use_user_ids"].lower() == "true"
  return types.SimpleNamespace(**fv.flag_values_dict(), hybrid=hybrid)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  data_path = pathlib.Path(args.data).expanduser().resolve()
  if not data_path.is_dir():
    raise errors.UsageError(f"--data {args.data}: not a directory (give a MovieLens or bring-your-own data folder)")
  source = detect_source(data_path)
  t0 = time.time()
  print(f"bench_quality: {data_path} ({source}); jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}", flush=True)
  config = data_config(args, data_path, source)
  data = InteractionData.from_builder(from_config.prepare_data(config))
  splits = dict(zip(*np.unique(data.split, return_counts=True)))
  print(f"data: {data.num_users} users, " + ", ".join(
      f"{s['name']} ({s['task']}) {len(ids)} items" for s, ids in zip(data.domains, data.item_ids)) +
        f"; interactions by split { {str(k): int(v) for k, v in splits.items()} } "
        f"({time.time() - t0:.0f}s)", flush=True)
  text = settings = served_model = None
  if not args.skip_model:
    # Our model: the library's one training path, as `python -m crossrec_jax.train` runs it.
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="bench_quality_"))
    with _timed(f"ours: train.train_and_evaluate (frozen encoder mode) in {workdir}"):
      served_model = train.train_and_evaluate(config, workdir)["model"]
    t = time.time()
    text = text_cache.cached_vectors(args.model, data.item_texts, args.item_max_length,
                                     cache_dir=args.text_cache or None)
    print(f"item text vectors: {args.model}, {len(data.item_texts)} items x {text.shape[1]}, "
          f"max {args.item_max_length} tokens ({time.time() - t:.0f}s; cached across runs)",
          flush=True)
    settings = HybridSettings.from_config(config, data)
    print(f"our model: {settings}", flush=True)
  results = Results()
  rating_section(data, text, args, results, data.names, settings, served_model)
  ranking_section(data, text, args, results, data.names, settings, served_model)
  if args.json:
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": str(data_path), "seconds": time.time() - t0,
                               "rows": results.rows, "paired": results.paired}, indent=1))
    print(f"\nrows written to {out}")
  print(f"\ntotal {time.time() - t0:.0f}s")
  return results


if __name__ == "__main__":
  sys.exit(cli.main_of(main))  # a user mistake: one line, exit code 2 (crossrec_jax/cli.py)
