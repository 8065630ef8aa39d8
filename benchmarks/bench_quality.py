"""Recommendation quality on real data: our model against classical baselines, same split, same run.

python benchmarks/bench_quality.py --data ../shared/data/ml-100k             # explicit: RMSE / MAE
python benchmarks/bench_quality.py --data ../shared/data/amazon-arts-office  # implicit: HR / NDCG
python benchmarks/bench_quality.py --data DIR --full    # accelerator-size training of our model

Any directory in the bring-your-own layout (interactions + items tables) or with MovieLens native
files works unchanged. Explicit (rating) domains get the rating table: global mean, user+item
bias, biased matrix factorisation (ALS, tuned on a validation slice of train) and our model.
Implicit domains get the ranking table, each target ranked among all items of its domain with
the user's earlier items of that domain excluded (the protocol of ``crossrec_jax.evaluate``):
popularity, item-kNN over the user's whole cross-domain history, EASE per domain, an ID-only
matrix factorisation (BPR), our model trained on each single domain and on all domains.
Hyper-parameters of the baselines are tuned on the valid split when the data has one, else on a
held-out slice of train; test is touched once per method.
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg
import scipy.sparse as sp

from crossrec_jax import config_defaults, metrics, train
from crossrec_jax.data import builder as builder_lib
from crossrec_jax.data.builder import decode_text
from crossrec_jax.data.processing import CONTEXT_SPLITS, assign_splits, link_users


# ------------------------------------------------------------------------------------------------
# Data: the raw interactions with the exact split the training pipeline uses.

@dataclasses.dataclass
class Data:
  domains: list[dict]                   # specs from the prepared data set (name, task, range)
  items: dict[str, list[str]]           # domain -> item ids, sorted (the Catalog's order)
  user: np.ndarray                      # per interaction: user index
  domain: np.ndarray                    # domain index
  col: np.ndarray                       # item column within its domain
  label: np.ndarray
  order: np.ndarray
  split: np.ndarray                     # train / valid / test / history
  user_keys: list[str]
  test: list[dict]                      # the prepared test split's records (as evaluated)
  valid: list[dict]

  def domain_index(self, name):
    return [d["name"] for d in self.domains].index(name)

  def offsets(self):
    sizes = [len(self.items[d["name"]]) for d in self.domains]
    return np.concatenate([[0], np.cumsum(sizes)])


def _records(source) -> list[dict]:
  out = []
  for i in range(len(source)):
    r = source[i]
    out.append({"user_key": decode_text(r["user_key"]), "domain": decode_text(r["domain"]),
                "item_id": decode_text(r["item_id"]), "label": float(r["label"]),
                "order": float(r["order"]), "user_in_train": bool(r["user_in_train"]),
                "history_items": [decode_text(h) for h in r["history_items"]]})
  return out


def load_data(config) -> Data:
  b = train.prepare_data(config)
  md = builder_lib.metadata(b)
  processing = train.processing_config(config)
  source = builder_lib.SourceConfig(config.data.source, config.data.path, config.data.bad_rows,
                                    processing)
  interactions, items, _ = builder_lib.read_source(source)
  keys = link_users(interactions, processing)
  splits = assign_splits(interactions, keys, processing)
  names = [d["name"] for d in md["domains"]]
  item_ids = {d: sorted(i for (dd, i) in items if dd == d) for d in names}
  col = {d: {i: n for n, i in enumerate(ids)} for d, ids in item_ids.items()}
  user_keys = sorted(set(keys.values()))
  user_index = {k: n for n, k in enumerate(user_keys)}
  src = b.as_data_source()
  return Data(
      domains=md["domains"], items=item_ids,
      user=np.array([user_index[keys[i]] for i in range(len(interactions))]),
      domain=np.array([names.index(x.domain) for x in interactions]),
      col=np.array([col[x.domain][x.item_id] for x in interactions]),
      label=np.array([x.label for x in interactions], np.float64),
      order=np.array([x.order for x in interactions], np.float64),
      split=np.array(splits), user_keys=user_keys,
      test=_records(src["test"]) if "test" in src else [],
      valid=_records(src["valid"]) if "valid" in src else [])


# ------------------------------------------------------------------------------------------------
# Explicit domains: rating baselines.

def fit_biases(u, i, r, n_users, n_items, reg, sweeps=15):
  mu = r.mean()
  bu, bi = np.zeros(n_users), np.zeros(n_items)
  for _ in range(sweeps):  # alternating ridge solutions
    bu = np.bincount(u, r - mu - bi[i], n_users) / (reg + np.bincount(u, minlength=n_users))
    bi = np.bincount(i, r - mu - bu[u], n_items) / (reg + np.bincount(i, minlength=n_items))
  return lambda uu, ii: mu + bu[uu] + bi[ii]


def fit_biased_mf(u, i, r, n_users, n_items, rank, reg, bias_reg=1.0, sweeps=15, seed=0):
  """r ~ mu + b_u + b_i + p_u.q_i by alternating least squares with frequency-weighted L2 on
  the factors (ALS-WR) and a plain L2 on the biases: each user/item is a small ridge solve."""
  mu = r.mean()
  rng = np.random.default_rng(seed)
  P = np.hstack([rng.normal(0, 0.1, (n_users, rank)), np.zeros((n_users, 1))])  # [p_u, b_u]
  Q = np.hstack([rng.normal(0, 0.1, (n_items, rank)), np.zeros((n_items, 1))])  # [q_i, b_i]
  by_user = np.split(np.argsort(u, kind="stable"), np.cumsum(np.bincount(u, minlength=n_users))[:-1])
  by_item = np.split(np.argsort(i, kind="stable"), np.cumsum(np.bincount(i, minlength=n_items))[:-1])

  def solve(rows_of, own, other, other_idx, other_bias_col):
    for e, rows in enumerate(rows_of):
      if not len(rows):
        own[e] = 0.0
        continue
      j = other_idx[rows]
      X = np.hstack([other[j, :rank], np.ones((len(rows), 1))])   # other's factors, and 1 for own bias
      y = r[rows] - mu - other[j, other_bias_col]
      penalty = np.diag(np.r_[np.full(rank, reg * len(rows)), bias_reg])
      own[e] = np.linalg.solve(X.T @ X + penalty, X.T @ y)

  for _ in range(sweeps):
    solve(by_user, P, Q, i, rank)
    solve(by_item, Q, P, u, rank)
  return lambda uu, ii: mu + P[uu, rank] + Q[ii, rank] + np.sum(P[uu, :rank] * Q[ii, :rank], 1)


def rating_baselines(data: Data, d: int, args) -> dict[str, dict]:
  """Global mean, user+item bias and biased MF, tuned on valid (or a 10% slice of train)."""
  name = data.domains[d]["name"]
  lo, hi = data.domains[d]["min_rating"], data.domains[d]["max_rating"]
  sel = data.domain == d
  u, i, r, s = data.user[sel], data.col[sel], data.label[sel], data.split[sel]
  n_users, n_items = len(data.user_keys), len(data.items[name])
  tr, te = s == "train", s == "test"
  if np.any(s == "valid"):
    fit, val = tr, s == "valid"
  else:  # hold out 10% of train for tuning, then refit on all of train
    rng = np.random.default_rng(args.seed)
    held = rng.random(len(r)) < 0.1
    fit, val = tr & ~held, tr & held
  clip = lambda x: np.clip(x, lo, hi)
  score = lambda p, m: {"rmse": metrics.rmse(clip(p), r[m]), "mae": metrics.mae(clip(p), r[m]),
                        "n": int(m.sum())}

  def tune(label, make, grid):
    results = []
    for params in grid:
      model = make(u[fit], i[fit], r[fit], **params)
      results.append((score(model(u[val], i[val]), val)["rmse"], params))
    best_rmse, best = min(results, key=lambda x: x[0])
    print(f"  {label}: tuned on {int(val.sum())} held-out ratings: " +
          ", ".join(f"{p} -> {v:.4f}" for v, p in results), flush=True)
    model = make(u[tr], i[tr], r[tr], **best)
    return score(model(u[te], i[te]), te) | {"params": best, "valid_rmse": best_rmse}

  out = {"global mean": score(np.full(te.sum(), r[tr].mean()), te)}
  out["user+item bias"] = tune(
      "user+item bias", lambda uu, ii, rr, reg: fit_biases(uu, ii, rr, n_users, n_items, reg),
      [{"reg": g} for g in args.bias_regs])
  out["biased MF (ALS)"] = tune(
      "biased MF", lambda uu, ii, rr, rank, reg: fit_biased_mf(uu, ii, rr, n_users, n_items, rank,
                                                               reg, seed=args.seed),
      [{"rank": k, "reg": g} for k in args.mf_ranks for g in args.mf_regs])
  return out


# ------------------------------------------------------------------------------------------------
# Implicit domains: ranking baselines on the prepared evaluation records.

@dataclasses.dataclass
class RankingTask:
  """The evaluation examples of one domain: targets, exclusions and the users' contexts."""
  domain: int
  target: np.ndarray                    # column of the held-out item
  exclude: np.ndarray                   # [n, N_d] earlier items of the domain
  context: sp.csr_matrix                # [n, N_all] all earlier items, every domain
  users: np.ndarray                     # user index, -1 if the user has no train interaction
  cold_user: np.ndarray


def ranking_task(data: Data, records: list[dict], d: int) -> RankingTask:
  name = data.domains[d]["name"]
  recs = [r for r in records if r["domain"] == name]
  col = {i: n for n, i in enumerate(data.items[name])}
  offsets = data.offsets()
  user_index = {k: n for n, k in enumerate(data.user_keys)}
  is_context = np.isin(data.split, CONTEXT_SPLITS)
  by_user = collections.defaultdict(list)
  for n in np.flatnonzero(is_context):
    by_user[data.user[n]].append(n)
  train_users = set(data.user[data.split == "train"].tolist())
  exclude = np.zeros((len(recs), len(col)), bool)
  rows, cols = [], []
  users = np.full(len(recs), -1)
  for k, r in enumerate(recs):
    for h in r["history_items"]:
      exclude[k, col[h]] = True
    uid = user_index[r["user_key"]]
    users[k] = uid if uid in train_users else -1
    for n in by_user.get(uid, ()):
      if data.order[n] < r["order"]:
        rows.append(k)
        cols.append(offsets[data.domain[n]] + data.col[n])
  context = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(recs), offsets[-1]))
  context.data[:] = 1.0  # an item seen twice counts once
  return RankingTask(d, np.array([col[r["item_id"]] for r in recs]), exclude, context, users,
                     users < 0)


def evaluate_scores(task: RankingTask, scores: np.ndarray, k: int) -> dict:
  rank, candidates = metrics.rank_of_target(scores, task.target, task.exclude)
  return metrics.ranking_metrics(rank, candidates, k) | {"n": len(task.target)}


def interaction_matrix(data: Data, splits=("train",)) -> sp.csr_matrix:
  """Users x all items (domains side by side), binary."""
  sel = np.isin(data.split, splits) & (data.label > 0)
  offsets = data.offsets()
  m = sp.csr_matrix((np.ones(sel.sum()), (data.user[sel], offsets[data.domain[sel]] + data.col[sel])),
                    shape=(len(data.user_keys), offsets[-1]))
  m.data[:] = 1.0
  return m


def item_similarity(X: sp.csr_matrix) -> sp.csr_matrix:
  """Cosine item-item similarity over co-occurrence in training sequences (zero diagonal)."""
  norms = np.sqrt(np.asarray(X.sum(0)).ravel())
  inv = sp.diags(np.where(norms > 0, 1.0 / np.maximum(norms, 1e-12), 0.0))
  sim = (inv @ (X.T @ X) @ inv).tocsr()
  sim.setdiag(0.0)
  return sim


def item_knn_scores(sim: sp.csr_matrix, task: RankingTask, data: Data) -> np.ndarray:
  """Item-kNN: similarities summed over the user's whole cross-domain history."""
  offsets = data.offsets()
  cols = slice(offsets[task.domain], offsets[task.domain + 1])
  return np.asarray((task.context @ sim[:, cols]).todense())


def ease_weights(X_d: sp.csr_matrix, lam: float) -> tuple[np.ndarray, np.ndarray]:
  """EASE (Steck 2019) on the items with training interactions: B = I - P / diag(P),
  P = (X'X + lam I)^-1, diag(B) = 0. Returns (active columns, B)."""
  active = np.flatnonzero(np.asarray(X_d.sum(0)).ravel() > 0)
  Xa = X_d[:, active]
  gram = (Xa.T @ Xa).toarray().astype(np.float32)
  gram[np.diag_indices_from(gram)] += lam
  c, info = scipy.linalg.lapack.spotrf(gram, lower=1, overwrite_a=1)
  if info:
    raise np.linalg.LinAlgError(f"Cholesky failed ({info})")
  P, info = scipy.linalg.lapack.spotri(c, lower=1, overwrite_c=1)
  P = np.tril(P) + np.tril(P, -1).T
  B = -P / np.diag(P)[None, :]
  B[np.diag_indices_from(B)] = 0.0
  return active, B


def ease_scores(active, B, task: RankingTask, data: Data) -> np.ndarray:
  offsets = data.offsets()
  h = task.context[:, offsets[task.domain]:offsets[task.domain + 1]][:, active]
  scores = np.full((h.shape[0], offsets[task.domain + 1] - offsets[task.domain]), -1e9, np.float32)
  scores[:, active] = np.asarray(h @ B)
  return scores


def train_bpr(X: sp.csr_matrix, data: Data, *, dim, epochs, lr, l2, seed):
  """ID-only matrix factorisation (user and item embeddings + item bias), BPR loss with one
  uniform negative of the positive's domain. Users without train interactions get no
  embedding: their scores are the item biases alone."""
  coo = X.tocoo()
  users, items = coo.row.astype(np.int32), coo.col.astype(np.int32)
  offsets = data.offsets()
  dom = np.searchsorted(offsets, items, side="right") - 1
  n_users, n_items = X.shape
  key = jax.random.PRNGKey(seed)
  k1, k2 = jax.random.split(key)
  params = {"u": 0.01 * jax.random.normal(k1, (n_users, dim)), "v": 0.01 * jax.random.normal(k2, (n_items, dim)),
            "b": jnp.zeros(n_items)}
  tx = optax.adam(lr)
  opt = tx.init(params)
  lo, size = jnp.asarray(offsets[:-1]), jnp.asarray(np.diff(offsets))

  @jax.jit
  def step(params, opt, u, i, d, key):
    j = lo[d] + jax.random.randint(key, i.shape, 0, size[d])
    def loss(p):
      pu = p["u"][u]
      s_i = jnp.sum(pu * p["v"][i], -1) + p["b"][i]
      s_j = jnp.sum(pu * p["v"][j], -1) + p["b"][j]
      reg = l2 * (jnp.sum(pu ** 2) + jnp.sum(p["v"][i] ** 2) + jnp.sum(p["v"][j] ** 2)) / len(u)
      return -jnp.mean(jax.nn.log_sigmoid(s_i - s_j)) + reg
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(params, updates), opt, value

  rng = np.random.default_rng(seed)
  batch = 4096
  for epoch in range(epochs):
    perm = rng.permutation(len(users))
    for start in range(0, len(perm) - batch + 1, batch):
      b = perm[start:start + batch]
      key, sub = jax.random.split(key)
      params, opt, value = step(params, opt, users[b], items[b], dom[b], sub)
  return jax.tree.map(np.asarray, params)


def bpr_scores(params, task: RankingTask, data: Data) -> np.ndarray:
  offsets = data.offsets()
  cols = slice(offsets[task.domain], offsets[task.domain + 1])
  user_vec = np.where(task.users[:, None] >= 0, params["u"][np.maximum(task.users, 0)], 0.0)
  return user_vec @ params["v"][cols].T + params["b"][cols][None, :]


def ranking_baselines(data: Data, args) -> dict[str, dict[str, dict]]:
  implicit = [d for d, s in enumerate(data.domains) if s["task"] == "implicit"]
  X = interaction_matrix(data)
  counts = np.asarray(X.sum(0)).ravel()
  offsets = data.offsets()
  tests = {d: ranking_task(data, data.test, d) for d in implicit}
  valids = {d: ranking_task(data, data.valid, d) for d in implicit} if data.valid else {}
  out = collections.defaultdict(dict)
  name = lambda d: data.domains[d]["name"]
  for d, task in tests.items():
    pop = np.broadcast_to(counts[offsets[d]:offsets[d + 1]], task.exclude.shape)
    out["popularity"][name(d)] = evaluate_scores(task, pop, args.k)
  t = time.time()
  sim = item_similarity(X)  # once for every domain
  for d, task in tests.items():
    out["item-kNN (cross-domain history)"][name(d)] = evaluate_scores(
        task, item_knn_scores(sim, task, data), args.k)
  print(f"  item-kNN: {time.time() - t:.0f}s", flush=True)
  for d, task in tests.items():
    t = time.time()
    X_d = X[:, offsets[d]:offsets[d + 1]]
    lams = args.ease_lambdas if d in valids and len(valids[d].target) else args.ease_lambdas[:1]
    best = None
    for lam in lams:
      active, B = ease_weights(X_d, lam)
      if len(lams) > 1:
        v = evaluate_scores(valids[d], ease_scores(active, B, valids[d], data), args.k)[f"ndcg@{args.k}"]
        print(f"  EASE {name(d)}: lambda {lam:g} -> valid NDCG@{args.k} {v:.4f}", flush=True)
        if best is not None and v <= best[0]:
          continue
        best = (v, lam, active, B)
      else:
        best = (None, lam, active, B)
    _, lam, active, B = best
    out["EASE (per domain)"][name(d)] = evaluate_scores(task, ease_scores(active, B, task, data),
                                                        args.k) | {"lambda": lam}
    print(f"  EASE {name(d)}: {len(active)} items with train interactions, lambda {lam:g}, "
          f"{time.time() - t:.0f}s", flush=True)
  t = time.time()
  params = train_bpr(X, data, dim=args.bpr_dim, epochs=args.bpr_epochs, lr=args.bpr_lr,
                     l2=args.bpr_l2, seed=args.seed)
  for d, task in tests.items():
    out["ID-only MF (BPR)"][name(d)] = evaluate_scores(task, bpr_scores(params, task, data), args.k) | {
        "cold_users": int(task.cold_user.sum())}
  print(f"  ID-only MF: {time.time() - t:.0f}s", flush=True)
  return dict(out)


# ------------------------------------------------------------------------------------------------
# Our model, trained and evaluated through the library (same prepared split).

def model_config(args, data_path: pathlib.Path, source: str, domains=()):
  c = config_defaults.base_config()
  c.seed = args.seed
  c.model.checkpoint = args.model
  c.data.source = source
  c.data.path = str(data_path)
  c.data.data_dir = str(pathlib.Path(args.workdir) / "tfds")
  c.data.domains = tuple(domains)
  if source == "movielens":
    c.data.split = "ratio"
    c.data.ratio = tuple(args.ratio)
  c.data.eval_split = "test"  # train once, evaluate test once at the end
  c.data.user_max_length = args.user_max_length
  c.data.item_max_length = args.item_max_length
  c.data.max_profile_items = args.max_profile_items
  c.batch_size = args.batch_size
  c.train_steps = args.steps or 0
  c.eval_every = 0
  c.checkpoint_every = args.steps or 0
  c.log_every = 50
  c.keep_checkpoints = 1
  c.optim.learning_rate = args.learning_rate
  c.optim.encoder_lr_factor = args.encoder_lr_factor
  c.optim.warmup_steps = max(1, (args.steps or 0) // 10)  # steps are set once the data is known
  c.adversarial.method = args.adversarial
  c.model.dim = args.dim
  c.model.dtype = args.dtype
  for override in args.set:
    _override(c, override)
  return c


def _override(config, assignment: str) -> None:
  """``--set optim.freeze_encoder_layers=-1``: one config field, value as a Python literal."""
  key, sep, text = assignment.partition("=")
  node, *path = key.strip().split(".")
  *parents, leaf = [node] + path
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a bare string such as adversarial.method=pgd
  target = config
  try:
    for name in parents:
      target = target[name]
    current = target[leaf]
  except KeyError:
    sys.exit(f"--set {assignment}: no config field {key!r} (see crossrec_jax/config_defaults.py)")
  if not sep:
    sys.exit(f"--set {assignment}: expected KEY=VALUE")
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  target[leaf] = value


def _buckets(n):  # hashed-ID table rows: about 2x the number of IDs keeps collisions rare
  return int(2 ** np.ceil(np.log2(max(2 * n, 1024))))


def run_model(args, data: Data, data_path, source, domains, label) -> dict[str, dict]:
  config = model_config(args, data_path, source, domains)
  config.model.user_buckets = _buckets(len(set(data.user[data.split == "train"].tolist())))
  config.model.item_buckets = _buckets(sum(len(v) for v in data.items.values()))
  workdir = pathlib.Path(args.workdir) / label
  t = time.time()
  result = train.train_and_evaluate(config, workdir)
  print(f"  {label}: {result['step']} steps x batch {args.batch_size} + test evaluation "
        f"in {time.time() - t:.0f}s", flush=True)
  return {k: v for k, v in result["metrics"].items() if "/" not in k}


# ------------------------------------------------------------------------------------------------
# Tables.

def rating_table(rows: dict[str, dict], domain: str) -> str:
  lines = [f"{domain} (explicit; test ratings n={next(iter(rows.values()))['n']})",
           f"  {'method':<38} {'RMSE':>7} {'MAE':>7}  tuned"]
  for name, m in rows.items():
    lines.append(f"  {name:<38} {m['rmse']:7.4f} {m['mae']:7.4f}  {m.get('params', '')}")
  return "\n".join(lines)


def ranking_table(rows: dict[str, dict[str, dict]], domains: list[str], k: int) -> str:
  head = "".join(f" {d + ' HR@' + str(k):>14} {'NDCG@' + str(k):>8}" for d in domains)
  lines = [f"implicit domains (full-catalog ranking, earlier items excluded; test n = " +
           ", ".join(f"{d} {next(iter(rows.values()))[d]['n']}" for d in domains) + ")",
           f"  {'method':<38}{head} {'all HR@' + str(k):>10} {'NDCG@' + str(k):>8}"]
  for name, per in rows.items():
    cells, hr, ndcg, n = "", 0.0, 0.0, 0
    for d in domains:
      m = per.get(d)
      if m is None:
        cells += f" {'-':>14} {'-':>8}"
        continue
      cells += f" {m[f'hr@{k}']:14.4f} {m[f'ndcg@{k}']:8.4f}"
      hr, ndcg, n = hr + m[f"hr@{k}"] * m["n"], ndcg + m[f"ndcg@{k}"] * m["n"], n + m["n"]
    overall = (f" {hr / n:10.4f} {ndcg / n:8.4f}" if all(d in per for d in domains)
               else f" {'-':>10} {'-':>8}")
    lines.append(f"  {name:<38}{cells}{overall}")
  return "\n".join(lines)


def detect_source(path: pathlib.Path) -> str:
  if (path / "u.data").exists() or (path / "ratings.dat").exists():
    return "movielens"
  return "byo"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="MovieLens or bring-your-own data directory")
  p.add_argument("--workdir", default="", help="default: runs/bench_quality/<data dir name>")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--ratio", type=float, nargs=3, default=(0.8, 0.0, 0.2),
                 help="train/valid/test split of MovieLens (random, seeded)")
  p.add_argument("--k", type=int, default=10)
  p.add_argument("--skip_model", action="store_true", help="baselines only")
  p.add_argument("--no_single_domain", action="store_true",
                 help="skip the single-domain models of a multi-domain data set")
  # Our model. CPU defaults: short sequences and a few hundred steps (~5 min per model on 2 cores).
  p.add_argument("--full", action="store_true",
                 help="accelerator sizes: 5000 steps, batch 64, profile 128 / item 32 tokens")
  p.add_argument("--model", default="embedded:all-MiniLM-L6-v2")
  p.add_argument("--steps", type=int, default=None,
                 help="per model; default 300 (CPU) / 5000 (--full) for a one-domain data set, and "
                      "100 / 3000 per model where one model per domain is trained as well")
  p.add_argument("--batch_size", type=int, default=None)
  p.add_argument("--user_max_length", type=int, default=None)
  p.add_argument("--item_max_length", type=int, default=None)
  p.add_argument("--max_profile_items", type=int, default=10)
  p.add_argument("--learning_rate", type=float, default=1e-3)
  p.add_argument("--encoder_lr_factor", type=float, default=0.1)
  p.add_argument("--adversarial", default="fgm", choices=("none", "fgm", "pgd", "smart"))
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="any other training config field, e.g. --set optim.freeze_encoder_layers=-1 "
                      "(repeatable; use a fresh --workdir per variant, as a workdir resumes)")
  # Baselines' grids.
  p.add_argument("--bias_regs", type=float, nargs="+", default=(2.0, 5.0, 10.0, 20.0))
  p.add_argument("--mf_ranks", type=int, nargs="+", default=(20, 50))
  p.add_argument("--mf_regs", type=float, nargs="+", default=(0.1, 0.15, 0.2))
  p.add_argument("--ease_lambdas", type=float, nargs="+", default=(100.0, 200.0))
  p.add_argument("--bpr_dim", type=int, default=64)
  p.add_argument("--bpr_epochs", type=int, default=20)
  p.add_argument("--bpr_lr", type=float, default=0.01)
  p.add_argument("--bpr_l2", type=float, default=1e-4)
  args = p.parse_args(argv)
  sizes = (64, 128, 32) if args.full else (32, 64, 24)
  for name, value in zip(("batch_size", "user_max_length", "item_max_length"), sizes):
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  data_path = pathlib.Path(args.data).expanduser().resolve()
  if not data_path.is_dir():
    sys.exit(f"--data {args.data}: not a directory (give a MovieLens or bring-your-own data folder)")
  args.workdir = args.workdir or str(pathlib.Path("runs/bench_quality") / data_path.name)
  source = detect_source(data_path)
  t0 = time.time()
  print(f"bench_quality: {data_path} ({source}); jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"{platform.processor() or platform.machine()}", flush=True)
  data = load_data(model_config(args, data_path, source))
  counts = collections.Counter(data.split.tolist())
  print(f"data: {len(data.user_keys)} users, " + ", ".join(
      f"{s['name']} ({s['task']}) {len(data.items[s['name']])} items" for s in data.domains) +
        f"; interactions by split {dict(counts)} ({time.time() - t0:.0f}s)", flush=True)
  per_domain_models = len(data.domains) > 1 and not args.no_single_domain
  if args.steps is None:
    args.steps = (3000 if per_domain_models else 5000) if args.full else (100 if per_domain_models else 300)
  if not args.skip_model:
    print(f"our model: {args.model}, {args.steps} steps x batch {args.batch_size} per model, "
          f"profile {args.user_max_length} / item {args.item_max_length} tokens, adversarial "
          f"{args.adversarial}, lr {args.learning_rate:g} (encoder x{args.encoder_lr_factor:g})"
          + "".join(f", {a}" for a in args.set), flush=True)

  explicit = [d for d, s in enumerate(data.domains) if s["task"] == "rating"]
  implicit = [d for d, s in enumerate(data.domains) if s["task"] == "implicit"]
  names = [s["name"] for s in data.domains]
  rating_rows = {names[d]: rating_baselines(data, d, args) for d in explicit}
  ranking_rows = ranking_baselines(data, args) if implicit else {}

  if not args.skip_model:
    if per_domain_models:
      for d, name in enumerate(names):
        ours = run_model(args, data, data_path, source, (name,), f"ours_{name}_only")
        label = "ours, trained on this domain only"
        if d in explicit:
          rating_rows[name][label] = ours[name]
        else:
          ranking_rows.setdefault(label, {})[name] = ours[name]
    ours = run_model(args, data, data_path, source, (), "ours_all_domains")
    label = "ours, all domains (text + ID)" if len(names) > 1 else "ours (text + ID)"
    for d in explicit:
      rating_rows[names[d]][label] = ours[names[d]]
    if implicit:
      ranking_rows[label] = {names[d]: ours[names[d]] for d in implicit}

  print()
  for name, rows in rating_rows.items():
    print(rating_table(rows, name) + "\n")
  if ranking_rows:
    print(ranking_table(ranking_rows, [names[d] for d in implicit], args.k) + "\n")
  out = pathlib.Path(args.workdir) / "results.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"args": vars(args), "rating": rating_rows, "ranking": ranking_rows},
                            indent=1, default=str))
  print(f"total {time.time() - t0:.0f}s; figures also in {out}")


if __name__ == "__main__":
  main()
