"""Stage-1 training on cached text vectors: histories, the hybrid model, ranking on device,
fusion, the interaction log and the text-vector cache."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp

from crossrec_jax import data as data_lib
from crossrec_jax import fusion, metrics, ranking, text_cache
from crossrec_jax.baselines import Popularity, UserItemBias, evaluate_ranking
from crossrec_jax.training.hybrid import fit_hybrid
from crossrec_jax.training.inputs import HybridSettings, build_histories, standardize
from crossrec_jax.interactions import InteractionData

RATING = {"name": "movies", "task": "rating", "min_rating": 1.0, "max_rating": 5.0}


def _log(domains, item_ids, rows):
  """rows: (user, domain, item, label, order, split)."""
  cols = list(zip(*rows))
  return InteractionData.from_columns(
      domains, item_ids, [[f"{d} item {i}" for i in ids] for d, ids in
                          zip([x["name"] for x in domains], item_ids)],
      user_key=cols[0], domain=cols[1], item_id=cols[2], label=cols[3], order=cols[4],
      split=cols[5])


def test_histories_before_target_are_strictly_earlier_newest_first():
  domains = [{"name": "a", "task": "implicit"}, {"name": "b", "task": "implicit"}]
  data = _log(domains, [["x", "y", "z"], ["p", "q"]], [
      ("u", "a", "x", 1, 1, "train"), ("u", "b", "p", 1, 2, "train"),
      ("u", "a", "y", 1, 3, "train"), ("u", "b", "q", 1, 3, "train"),  # same time as y
      ("u", "a", "z", 1, 4, "test"), ("v", "a", "z", 1, 1, "history"), ("v", "a", "x", 1, 2, "test")])
  rows = np.flatnonzero(data.split != "history")
  hist, example_hist, hist_domain, _ = build_histories(data, rows, "before_target", 4)
  pad = data.num_items
  by_row = {int(r): [int(i) for i in hist[example_hist[k]] if i != pad] for k, r in enumerate(rows)}
  x, y, z, p, q = 0, 1, 2, 3, 4
  assert by_row[0] == []                     # first interaction: nothing before it
  assert by_row[1] == [x]
  assert by_row[2] == [p, x]                 # newest first, across domains
  assert by_row[3] == [p, x]                 # y has the same time as q: not "before"
  assert by_row[4] == [q, y, p, x]           # the test target sees all earlier context
  assert by_row[6] == [z]                    # a cold user's history rows count
  assert list(hist_domain[example_hist[[0, 1]]]) == [0, 1]


def _planted_ratings(seed=0, users=120, items=60):
  rng = np.random.default_rng(seed)
  u_f, i_f = rng.normal(size=(users, 2)), rng.normal(size=(items, 2))
  rows = []
  for u in range(users):
    for t, i in enumerate(rng.choice(items, 25, replace=False)):
      r = float(np.clip(np.round(3 + 0.9 * u_f[u] @ i_f[i] + rng.normal(0, 0.3)), 1, 5))
      rows.append((f"u{u}", "movies", f"m{i}", r, t, "test" if rng.random() < 0.2 else "train"))
  return _log([RATING], [[f"m{i}" for i in range(items)]], rows)


def _settings(data, **changes):
  return dataclasses.replace(HybridSettings.defaults_for(data), **changes)


def test_hybrid_learns_ratings_beyond_the_biases():
  data = _planted_ratings()
  test = data.queries("test", 0, context="all")
  bias = metrics.rmse(UserItemBias(reg=2.0).fit(data).score_pairs(test), test.label)
  model = fit_hybrid(data, _settings(data, epochs=150, dim=8, reg_history=10.0, reg_factors=0.05),
                     verbose=False)
  assert model.context == "all"  # a random split: histories are the whole context (SVD++)
  ours = metrics.rmse(np.clip(model.score_pairs(test), 1, 5), test.label)
  assert ours < bias - 0.1, (ours, bias)


def test_user_tags_carry_taste_to_users_with_few_ratings():
  """Ratings planted by a user group (a tag) x item factor; test users have 2 train ratings, so
  only the tag tells their taste."""
  rng = np.random.default_rng(3)
  groups, i_f = rng.normal(size=(4, 2)) * 1.5, rng.normal(size=(40, 2))
  rows, tags = [], {}
  for u in range(160):
    g = u % 4
    tags[f"u{u}"] = [f"group:{g}"]
    sparse = u >= 120
    for t, i in enumerate(rng.choice(40, 12, replace=False)):
      r = float(np.clip(np.round(3 + groups[g] @ i_f[i] + rng.normal(0, 0.3)), 1, 5))
      rows.append((f"u{u}", "movies", f"m{i}", r, t, "test" if sparse and t >= 2 else "train"))
  data = _log([RATING], [[f"m{i}" for i in range(40)]], rows)
  data = dataclasses.replace(data, user_tags=[tags[k] for k in data.user_keys])
  test = data.queries("test", 0, context="all")
  rmse = {}
  for use in (False, True):
    model = fit_hybrid(data, _settings(data, epochs=150, dim=8, use_user_tags=use, reg_user_tags=1.0),
                       verbose=False)
    rmse[use] = metrics.rmse(np.clip(model.score_pairs(test), 1, 5), test.label)
  assert rmse[True] < rmse[False] - 0.1, rmse


def test_a_train_target_is_taken_out_of_its_own_history():
  data = _planted_ratings()
  text = np.random.default_rng(1).normal(size=(data.num_items, 8)).astype(np.float32)
  model = fit_hybrid(data, _settings(data, epochs=3, dim=8, use_history_text=True), text=text,
                     verbose=False).model
  tables = standardize(text)
  domain_of_item = jnp.zeros(data.num_items + 1, jnp.int32)
  items = np.array([[3, 7, 11, data.num_items]], np.int32)
  common = {"hist_domain": np.zeros(1, np.int32), "hist_profile": np.zeros(1, np.int32),
            "example_hist": np.zeros(1, np.int32), "user": np.array([5], np.int32),
            "domain": np.zeros(1, np.int32), "item": np.array([7], np.int32)}
  with_target = model.example_user_vectors(
      common | {"hist": items, "self_in_history": np.ones(1, np.int32)}, jnp.asarray(tables),
      domain_of_item)
  without = model.example_user_vectors(
      common | {"hist": np.array([[3, 11, data.num_items, data.num_items]], np.int32),
                "self_in_history": np.zeros(1, np.int32)}, jnp.asarray(tables), domain_of_item)
  np.testing.assert_allclose(np.asarray(with_target), np.asarray(without), atol=1e-5)
  leaky = model.example_user_vectors(
      common | {"hist": items, "self_in_history": np.zeros(1, np.int32)}, jnp.asarray(tables),
      domain_of_item)
  assert not np.allclose(np.asarray(leaky), np.asarray(without), atol=1e-4)


def _planted_sequences(seed=0, users=300, items=40):
  """Two implicit domains whose items come in pairs: after item i of domain a a user takes item
  i of domain b; cold test users are known only by their history."""
  rng = np.random.default_rng(seed)
  domains = [{"name": "a", "task": "implicit"}, {"name": "b", "task": "implicit"}]
  rows = []
  for u in range(users):
    split = "train" if u < 240 else "history"
    for t, i in enumerate(rng.choice(items, 3, replace=False)):
      rows.append((f"u{u}", "a", f"a{i}", 1, 2 * t, split))
      last = t == 2 and u >= 240
      rows.append((f"u{u}", "b", f"b{i}", 1, 2 * t + 1, ("test" if u >= 270 else "valid") if last else split))
  return _log(domains, [[f"a{i}" for i in range(items)], [f"b{i}" for i in range(items)]], rows)


def test_prefix_windows_give_exactly_the_per_example_histories():
  """Prefix histories (before_target) read off per-user sequences and per-domain prefix sums
  (what training uses: cost linear in the sequences) equal the per-example histories that
  evaluation pools row by row, for every history term (ID factors, text MLP, profile, gates),
  with users longer than the history length and windows crossing domains."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from crossrec_jax.training import hybrid  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  domains = [{"name": "a", "task": "implicit"}, {"name": "b", "task": "rating", "min_rating": 1.0,
                                                   "max_rating": 5.0}]
  rows = []
  for u in range(60):
    n = int(rng.integers(1, 40))  # some users far past history_length
    for t in range(n):
      d = "a" if rng.random() < 0.6 else "b"
      split = "test" if t == n - 1 and n > 2 else "train"
      rows.append((f"u{u}", d, f"{d}{rng.integers(25)}", float(rng.integers(1, 6)) if d == "b" else 1.0,
                   t, split))
  rows = list({(r[0], r[1], r[2]): r for r in rows}.values())  # one row per (user, item)
  data = _log(domains, [[f"a{i}" for i in range(25)], [f"b{i}" for i in range(25)]], rows)
  text = rng.normal(size=(data.num_items, 8)).astype(np.float32)
  settings = _settings(data, dim=8, history_length=7, batch_size=64, use_history_text=True,
                       context="before_target")
  setup = hybrid.training_setup(data, settings, text)
  assert setup.windows is not None and not setup.window_domains  # short histories: not worth it
  model = setup.model
  state = nnx.state(model, nnx.Param)  # every term non-zero
  nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.3, x.dtype), state))
  t = setup.tables
  for d in setup.examples:
    chosen = rng.permutation(len(setup.examples[d]))[:50]
    args = (data, setup.examples[d], setup.position[d], chosen, setup.batch_size[d],
            setup.width[d], *setup.histories, setup.profile_rows, True)
    by_rows, by_windows = hybrid._train_batch(*args), hybrid._train_batch(*args, setup.windows)  # pylint: disable=protected-access
    assert "seq_items" in by_windows and "seq_items" not in by_rows
    out = [np.asarray(model.example_user_vectors(
        {k: jnp.asarray(v) for k, v in b.items()}, t["text"], t["domain_of_item"], t["profile"],
        user_tags=t["user_tags"])) for b in (by_rows, by_windows)]
    assert np.abs(out[0]).max() > 0.1
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)

  # Long sequences trained full-batch (ratings): per-example histories would hold ~28x the
  # sequences' entries, so training takes the windows there.
  long_rows = [(f"u{u}", "b", f"b{i}", float(rng.integers(1, 6)), i, "train")
               for u in range(20) for i in range(60)] + [("u0", "a", "a0", 1.0, 99, "test")]
  long = _log(domains, [["a0"], [f"b{i}" for i in range(60)]], long_rows)
  long_setup = hybrid.training_setup(long, _settings(long, history_length=50, batch_size=1 << 20,
                                                     context="before_target"))
  assert long_setup.window_domains == (1,), long_setup.window_domains


def test_hybrid_ranks_cold_users_from_their_cross_domain_history():
  data = _planted_sequences()
  test = data.queries("test", 1)
  text = np.random.default_rng(0).normal(size=(data.num_items, 16)).astype(np.float32)
  settings = _settings(data, epochs=40, dim=16, batch_size=256, learning_rate=0.02)
  model = fit_hybrid(data, settings, text=text, verbose=False)
  ours = evaluate_ranking(model.score_catalog(test, 1), test, data, 1)
  pop = evaluate_ranking(Popularity().fit(data).score_catalog(test, 1), test, data, 1)
  assert ours["hr@10"] > 0.8 and pop["hr@10"] < 0.5, (ours, pop)
  # Without the other domain's history the pairing cannot be seen.
  single = fit_hybrid(data, dataclasses.replace(settings, cross_domain=False), text=text,
                      verbose=False)
  alone = evaluate_ranking(single.score_catalog(test, 1), test, data, 1)
  assert alone["hr@10"] < ours["hr@10"] - 0.3, (alone, ours)


def test_apr_perturbation_changes_the_update():
  data = _planted_sequences(users=280)
  base = _settings(data, epochs=2, dim=8)
  plain = fit_hybrid(data, base, verbose=False)
  apr = fit_hybrid(data, dataclasses.replace(base, adversarial="apr"), verbose=False)
  assert "adversarial" in apr.log[-1] and "adversarial" not in plain.log[-1]
  assert apr.log[-1]["adversarial"] > apr.log[-1]["loss"]  # the worst case is worse
  assert not np.allclose(np.asarray(plain.model.item_factors.value),
                         np.asarray(apr.model.item_factors.value))


def test_rank_of_targets_matches_the_host_reference_and_hand_values():
  scores = np.array([[0.5, 0.9, 0.5, 0.1], [1.0, 2.0, 3.0, 4.0]], np.float32)
  exclude = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 0, 1]]))
  rank, cand = ranking.rank_of_targets(scores, np.array([0, 1]), exclude)
  # Row 0: item 1 excluded, item 2 ties the target (half), item 3 is lower -> rank 0.5 of 3.
  # Row 1: item 3 excluded, item 2 higher -> rank 1 of 3.
  np.testing.assert_allclose(rank, [0.5, 1.0])
  np.testing.assert_allclose(cand, [3, 3])
  rng = np.random.default_rng(0)
  s = rng.integers(0, 5, (50, 30)).astype(np.float32)
  t = rng.integers(0, 30, 50)
  ex = sp.random(50, 30, 0.2, format="csr", random_state=1)
  got = ranking.rank_of_targets(s, t, ex, block=16)
  # The reference, row by row: the candidates are the target and the items not excluded.
  for row, (score, target) in enumerate(zip(s, t)):
    keep = ex[row].toarray()[0] == 0
    keep[target] = True
    higher = np.sum(score[keep] > score[target])
    assert got[0][row] == higher + 0.5 * (np.sum(score[keep] == score[target]) - 1)
    assert got[1][row] == keep.sum()
  m = ranking.ranking_metrics(scores, np.array([0, 1]), exclude, k=1)
  assert m["hr@1"] == 0.5 and m["ndcg@1"] == pytest.approx(0.5)


def test_fusion_weights_pick_the_informative_component():
  rng = np.random.default_rng(0)
  n, items = 200, 50
  target = rng.integers(0, items, n)
  good = rng.normal(size=(n, items))
  good[np.arange(n), target] += 2.5
  noise = rng.normal(size=(n, items)) * 100  # a different scale: z-scoring removes it
  weights, tried = fusion.tune_weights({"good": good, "noise": noise}, target, None, k=10)
  assert weights["good"] > 0 and weights["noise"] == 0, weights
  assert len(tried) < len(fusion.DEFAULT_GRID) ** 2  # proportional duplicates are skipped
  fused = fusion.fuse({"good": good, "noise": noise}, {"good": 1.0, "noise": 0.0})
  np.testing.assert_allclose(np.asarray(fused), np.asarray(fusion.zscore_rows(good)), atol=1e-5)
  with pytest.raises(ValueError, match="all zero"):
    fusion.fuse({"good": good}, {"good": 0.0})


def test_cold_item_terms_lift_cold_targets_only_when_valid_says_so():
  """CF sees warm items only (cold columns at its floor); the text component sees every item. With
  cold targets the tuned terms boost text / add an offset on the cold columns; with none the
  plain fusion (no terms) is kept; ``fuse`` adds exactly boost * z + offset on those columns."""
  rng = np.random.default_rng(0)
  n, items = 300, 60
  counts = np.where(np.arange(items) < 45, 10, 0)  # items 45.. are cold (no train interaction)
  cold_targets = rng.random(n) < 0.4
  target = np.where(cold_targets, rng.integers(45, items, n), rng.integers(0, 45, n))
  cf = rng.normal(size=(n, items))
  cf[np.arange(n), target] += np.where(cold_targets, 0.0, 3.0)
  cf[:, 45:] = -3.0  # CF cannot score cold items: they sit below everything it scored
  text = rng.normal(size=(n, items))
  text[np.arange(n), target] += 1.5
  parts = {"item_knn": cf, "text_knn": text}
  weights, _ = fusion.tune_weights(parts, target, None, k=10)
  terms = fusion.tune_cold(parts, weights, target, None, counts, max_train=2)
  assert terms.active and (terms.boost["text_knn"] > 0 or terms.offset > 0), terms
  plain = ranking.ranking_metrics(np.asarray(fusion.fuse(parts, weights)), target, None, k=10)
  lifted = ranking.ranking_metrics(np.asarray(fusion.fuse(parts, weights, terms)), target, None, k=10)
  assert lifted["ndcg@10"] > plain["ndcg@10"] + 0.02, (plain, lifted)
  expected = np.array(fusion.fuse(parts, weights))
  expected[:, 45:] += terms.boost["text_knn"] * np.asarray(fusion.zscore_rows(text))[:, 45:] + terms.offset
  np.testing.assert_allclose(np.asarray(fusion.fuse(parts, weights, terms)), expected, atol=1e-5)
  saved = fusion.ColdItems.from_json(terms.to_json(), counts)
  np.testing.assert_array_equal(saved.columns, terms.columns)
  assert saved.boost == terms.boost and saved.offset == terms.offset

  warm = np.where(cold_targets, rng.integers(0, 45, n), target)  # no target is cold
  cf_warm = rng.normal(size=(n, items))
  cf_warm[np.arange(n), warm] += 3.0
  cf_warm[:, 45:] = -3.0
  warm_parts = {"item_knn": cf_warm, "text_knn": rng.normal(size=(n, items))}
  warm_weights, _ = fusion.tune_weights(warm_parts, warm, None, k=10)
  assert not fusion.tune_cold(warm_parts, warm_weights, warm, None, counts, max_train=2).active


def test_interaction_log_reads_every_split_and_caches_it(tmp_path):
  cfg = data_lib.SyntheticConfig(num_users=30, items_per_domain=12, seed=0)
  builder = data_lib.prepare("synthetic", data_dir=str(tmp_path), synthetic_config=cfg)
  first = InteractionData.from_builder(builder)
  interactions, _ = data_lib.synthetic.generate(cfg)
  assert len(first.user) == len(interactions)            # history rows included
  cache = tmp_path.rglob("interaction_log.npz")
  assert next(cache, None) is not None
  again = InteractionData.from_builder(builder)
  for field in ("user", "domain", "item", "label", "order", "split"):
    np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
  assert again.item_texts == first.item_texts and again.user_keys == first.user_keys
  q = first.queries("test")
  for k in range(len(q)):
    rows = np.flatnonzero((first.user == first.user[q.row[k]]) & np.isin(first.split, ("train", "history"))
                          & (first.order < first.order[q.row[k]]))
    assert set(q.context[k].indices) == set(first.item[rows])


def test_text_vector_cache_is_keyed_and_survives_a_corrupt_file(tiny_checkpoint, tmp_path):
  encoder = text_cache.TextEncoder(str(tiny_checkpoint), batch_size=8)
  texts = ["the blue album", "a dark city night", "", "jazz"]
  first = text_cache.cached_vectors("", texts, 16, cache_dir=tmp_path, encoder=encoder,
                                    progress=False)
  files = list(tmp_path.glob("*.npy"))
  assert len(files) == 1 and first.shape == (4, encoder.dim)
  # Batched, length-sorted encoding equals encoding each text alone.
  for t, v in zip(texts, first):
    np.testing.assert_allclose(encoder.encode([t], 16)[0], v, atol=1e-5)
  np.save(files[0], np.zeros_like(first))   # the cache is read back, not recomputed
  np.testing.assert_array_equal(
      text_cache.cached_vectors("", texts, 16, cache_dir=tmp_path, encoder=encoder), 0)
  text_cache.cached_vectors("", texts, 8, cache_dir=tmp_path, encoder=encoder)
  assert len(list(tmp_path.glob("*.npy"))) == 2             # another max length: another key
  files[0].write_bytes(b"not a numpy file")
  again = text_cache.cached_vectors("", texts, 16, cache_dir=tmp_path, encoder=encoder)
  np.testing.assert_allclose(again, first, atol=1e-6)


def test_frozen_run_beats_its_baselines_checkpoints_and_restores(tmp_path, capsys):
  from crossrec_jax import train  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("tiny", **{"encoder_mode": "frozen", "data.data_dir": str(tmp_path / "tfds"),
                                  "data.synthetic_users": 200, "data.items_per_domain": 40,
                                  "hybrid.epochs": 30, "train_steps": 0})
  first = train.train_and_evaluate(config, tmp_path / "run")
  assert (tmp_path / "run" / "checkpoints").is_dir()
  assert list((tmp_path / "run" / "text_cache").glob("*.npy"))       # cached in the workdir
  m = first["metrics"]
  assert set(m) == {"books", "movies", "music"}
  for name in ("books", "movies"):
    assert m[name]["rmse"] < m[name]["baseline_rmse"], m[name]
  assert m["music"]["ndcg@10"] > m["music"]["baseline_ndcg@10"], m["music"]
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert {l["split"] for l in lines} == {"train", "valid", "test"}
  capsys.readouterr()
  again = train.train_and_evaluate(config, tmp_path / "run")
  assert "Restored the frozen-mode model" in capsys.readouterr().out
  assert again["metrics"] == first["metrics"]
  # `python -m crossrec_jax.evaluate` restores the same served model and reports the same figures.
  from crossrec_jax import evaluate  # pylint: disable=import-outside-toplevel
  assert evaluate.evaluate_workdir(tmp_path / "run", "test") == first["metrics"]
  _scores_the_frozen_run(config, tmp_path)


def _scores_the_frozen_run(config, tmp_path):
  """The scoring CLI serves the fused frozen-mode model: top-K without the user's own items, and
  pair scores equal to the top-K scores of the same (user, item)."""
  import csv  # pylint: disable=import-outside-toplevel
  from crossrec_jax import score  # pylint: disable=import-outside-toplevel
  files = data_lib.synthetic.export(tmp_path / "inputs", data_lib.SyntheticConfig(
      num_users=config.data.synthetic_users, items_per_domain=config.data.items_per_domain,
      seed=config.seed))
  run = lambda output, **kw: score.run_scoring(tmp_path / "run", files / "interactions.csv",
                                               files / "items.csv", tmp_path / output, **kw)
  counts = run("top.csv", top_k=3, domains=["music", "books"])
  with open(tmp_path / "top.csv") as f:
    top = list(csv.DictReader(f))
  assert counts["rows"] == len(top) > 0
  assert {r["domain"] for r in top} == {"music", "books"}
  assert {r["rank"] for r in top} == {"1", "2", "3"}
  with open(files / "interactions.csv") as f:
    seen = {(r["user_id"], r["domain"], r["item_id"]) for r in csv.DictReader(f)}
  leaked = [r for r in top if (r["user_id"], r["domain"], r["item_id"]) in seen]
  assert not leaked, f"recommended items from the user's own history: {leaked[:3]}"
  for (u, d), rows in _group(top).items():
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows),
                                                        reverse=True), (u, d)
  music = [r for r in top if r["domain"] == "music"][:20]
  with open(tmp_path / "pairs.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["user_id", "item_id", "domain"])
    w.writerows([(r["user_id"], r["item_id"], "music") for r in music] +
                [(music[0]["user_id"], sorted({r["item_id"] for r in top if r["domain"] == "books"})[0],
                  "books")])
  run("pairs.csv.out.csv", pairs=tmp_path / "pairs.csv")
  with open(tmp_path / "pairs.csv.out.csv") as f:
    pairs = list(csv.DictReader(f))
  np.testing.assert_allclose([float(r["score"]) for r in pairs[:-1]],
                             [float(r["score"]) for r in music], rtol=1e-5, atol=1e-5)
  assert 1.0 <= float(pairs[-1]["score"]) <= 5.0 and pairs[-1]["task"] == "rating"
  # An item never trained on (text only) is scored from its text with the run's encoder.
  (tmp_path / "items_new.csv").write_text((files / "items.csv").read_text(encoding="utf-8") +
                                          "zz-new,music,a brand new song\n", encoding="utf-8")
  score.run_scoring(tmp_path / "run", files / "interactions.csv", tmp_path / "items_new.csv",
                    tmp_path / "new.csv", top_k=100, domains=["music"])
  with open(tmp_path / "new.csv") as f:
    new = [r for r in csv.DictReader(f) if r["item_id"] == "zz-new"]
  assert new and all(np.isfinite(float(r["score"])) for r in new)


def _group(rows):
  out = {}
  for r in rows:
    out.setdefault((r["user_id"], r["domain"]), []).append(r)
  return out


def test_zscore_ignores_unscorable_items():
  scores = np.array([[1.0, 2.0, 3.0, np.finfo(np.float32).min]], np.float32)
  z = np.asarray(fusion.zscore_rows(scores))
  np.testing.assert_allclose(z[0, :3], [-1.2247449, 0.0, 1.2247449], atol=1e-5)
  assert z[0, 3] < z[0, 0] and np.isfinite(z[0, 3])
