"""crossrec_jax.evaluation: the one evaluator. The sampled protocol's negatives (drawn once from a
seed, never the user's own items or the target), a perfect and a constant scorer under both
protocols, the cold-user / cold-item slices and the baseline rows against hand-computed values,
the end-to-end item mean equal to the baselines' one, and the printed protocol."""

import types

import numpy as np
import pytest
import scipy.sparse as sp

from crossrec_jax import baselines as bl
from crossrec_jax import config_defaults, evaluation
from crossrec_jax.interactions import InteractionData

SHOP = {"name": "shop", "task": "implicit", "min_rating": 0.0, "max_rating": 1.0}
FILMS = {"name": "films", "task": "rating", "min_rating": 1.0, "max_rating": 5.0}
SHOP_ITEMS = [f"s{i}" for i in range(8)]


@pytest.fixture(name="toy", scope="module")
def fixture_toy():
  """Shop train counts s0 4, s1 3, s2 2, s3-s5 1, s6-s7 0. Test targets: u1 -> s3, u2 -> s2,
  u3 -> s1, and the cold users (no train row) c5 (history s0) -> s1, c6 (history s1) -> s6.
  u1 also has a later valid item, s7. Films: train u1 f0 5, u2 f0 3, u1 f1 2; test u3 f0 4,
  c5 f1 1, u4 f2 3 (f2 unrated)."""
  rows = [("u1", "shop", s, 1.0, "train") for s in ("s0", "s1", "s2")]
  rows += [("u2", "shop", s, 1.0, "train") for s in ("s0", "s1", "s3")]
  rows += [("u3", "shop", s, 1.0, "train") for s in ("s0", "s2", "s4")]
  rows += [("u4", "shop", s, 1.0, "train") for s in ("s0", "s1", "s5")]
  rows += [("u1", "films", "f0", 5.0, "train"), ("u2", "films", "f0", 3.0, "train"),
           ("u1", "films", "f1", 2.0, "train")]
  rows += [("c5", "shop", "s0", 1.0, "history"), ("c6", "shop", "s1", 1.0, "history")]
  rows += [("u1", "shop", "s3", 1.0, "test"), ("u2", "shop", "s2", 1.0, "test"),
           ("u3", "shop", "s1", 1.0, "test"), ("c5", "shop", "s1", 1.0, "test"),
           ("c6", "shop", "s6", 1.0, "test"), ("u3", "films", "f0", 4.0, "test"),
           ("c5", "films", "f1", 1.0, "test"), ("u4", "films", "f2", 3.0, "test"),
           ("u1", "shop", "s7", 1.0, "valid")]
  users, domains, items, labels, splits = zip(*rows)
  ids = [SHOP_ITEMS, ["f0", "f1", "f2"]]
  return InteractionData.from_columns(
      [SHOP, FILMS], ids, [[f"text of {i}" for i in x] for x in ids], user_key=users,
      domain=domains, item_id=items, label=labels, order=np.arange(len(rows)), split=splits)


class Fixed:
  """The same score per item for every query (``item_scores``), a constant rating."""

  def __init__(self, data, item_scores, rating=3.0):
    self.offsets, self.item_scores, self.rating = data.offsets, np.asarray(item_scores), rating

  def score_catalog(self, queries, domain):
    cols = self.item_scores[self.offsets[domain]:self.offsets[domain + 1]]
    return np.tile(cols, (len(queries), 1)).astype(np.float32)

  def score_pairs(self, queries):
    return np.full(len(queries), self.rating)


class Perfect(Fixed):
  """Scores each query's own target 1 and every other item 0."""

  def score_catalog(self, queries, domain):
    size = self.offsets[domain + 1] - self.offsets[domain]
    out = np.zeros((len(queries), size), np.float32)
    out[np.arange(len(queries)), queries.item - self.offsets[domain]] = 1.0
    return out


def _config(ks=(1, 5), negatives=3, seed=0):
  c = config_defaults.base_config()
  c.eval.ks, c.eval.sampled_negatives, c.eval.seed = ks, negatives, seed
  return c


def _owned(data, queries):
  """Per query the set of shop columns its user has in any split."""
  shop = data.domain == 0
  return [set(data.item[shop & (data.user == data.user[r])].tolist()) for r in queries.row]


def test_sampled_negatives_are_drawn_once_from_the_seed_and_avoid_the_users_items(toy):
  q = toy.queries("test", 0)
  first = evaluation.sample_negatives(toy, q, 0, 5, seed=7)
  np.testing.assert_array_equal(first, evaluation.sample_negatives(toy, q, 0, 5, seed=7))
  assert first.shape == (5, 5) and first.dtype == np.int32
  others = [evaluation.sample_negatives(toy, q, 0, 5, seed=s) for s in range(8, 12)]
  assert any(not np.array_equal(first, o) for o in others)
  for negatives, owned, target in zip(first, _owned(toy, q), q.item):
    drawn = negatives[negatives >= 0]
    assert len(set(drawn.tolist())) == len(drawn)                # without replacement
    assert target in owned and not set(drawn.tolist()) & owned   # not the target, not owned
    # Every item the user does not own is drawn (5 asked, at most 6 allowed), the rest is -1.
    assert len(drawn) == min(5, len(SHOP_ITEMS) - len(owned))
  # u1 owns s0-s2 (train), s3 (the target) and s7 (a later valid row): s4-s6 only, then -1.
  np.testing.assert_array_equal(first[0], [4, 5, 6, -1, -1])


def test_draw_negatives_is_uniform_and_independent_of_the_block_size():
  avoid = sp.csr_matrix((np.ones(3000), (np.arange(3000), np.zeros(3000, int))), shape=(3000, 20))
  drawn = evaluation.draw_negatives(avoid, 4, np.random.default_rng(0), block=1024)
  np.testing.assert_array_equal(
      drawn, evaluation.draw_negatives(avoid, 4, np.random.default_rng(0), block=7))
  counts = np.bincount(drawn.ravel(), minlength=20)
  assert counts[0] == 0
  expected = 3000 * 4 / 19
  assert np.all(np.abs(counts[1:] - expected) < 0.15 * expected), counts


def test_a_perfect_scorer_ranks_first_and_a_constant_one_half_way_under_both_protocols(toy):
  perfect = evaluation.evaluate_model(Perfect(toy, np.zeros(toy.num_items)), toy, "test", _config())
  for key in ("shop", "shop/sampled"):
    m = perfect[key]
    assert (m["hr@1"], m["ndcg@1"], m["mrr@1"], m["recall@5"], m["auc"]) == (1, 1, 1, 1, 1), key
  constant = evaluation.evaluate_model(Fixed(toy, np.ones(toy.num_items)), toy, "test",
                                       _config())["shop/sampled"]
  # 3 negatives, all tied with the target: rank 1.5 of 4 for every target.
  assert constant["negatives"] == 3 and constant["n"] == 5
  assert constant == pytest.approx(constant | {
      "hr@1": 0.0, "hr@5": 1.0, "ndcg@5": 1 / np.log2(3), "mrr@5": 0.5, "recall@5": 1.0,
      "auc": 0.5})


def test_slices_and_baseline_rows_by_hand(toy):
  counts = toy.item_counts()
  results = evaluation.evaluate_model(Fixed(toy, counts), toy, "test", _config())
  assert set(results) == {
      "shop", "shop/cold_users", "shop/cold_items", "shop/sampled", "shop/sampled/cold_users",
      "shop/sampled/cold_items", "films", "films/cold_users", "films/cold_items"}
  # Ours scores by popularity, so its rows equal the baseline's. Full-catalog ranks, the
  # earlier items excluded, ties half: u1 -> s3 1.0 of 5 (s4, s5 tie), u2 -> s2 0 of 5,
  # u3 -> s1 0 of 5, c5 -> s1 0 of 7, c6 -> s6 5.5 of 7 (5 above, s7 tied).
  shop = results["shop"]
  assert shop["n"] == 5
  assert shop == pytest.approx(shop | {
      "hr@1": 3 / 5, "hr@5": 4 / 5, "ndcg@5": (1 / np.log2(3) + 3) / 5, "mrr@5": (0.5 + 3) / 5,
      "recall@5": 4 / 5, "auc": ((1 - 1 / 4) + 1 + 1 + 1 + (1 - 5.5 / 6)) / 5})
  cold_users = results["shop/cold_users"]          # c5, c6: ranks 0 and 5.5
  assert cold_users["n"] == 2
  assert cold_users == pytest.approx(cold_users | {
      "hr@1": 0.5, "hr@5": 0.5, "ndcg@5": 0.5, "mrr@5": 0.5, "auc": (1 + (1 - 5.5 / 6)) / 2})
  cold_items = results["shop/cold_items"]          # <= 2 train interactions: s3, s2, s6
  assert cold_items["n"] == 3
  assert cold_items == pytest.approx(cold_items | {
      "hr@1": 1 / 3, "hr@5": 2 / 3, "ndcg@5": (1 / np.log2(3) + 1) / 3, "mrr@5": 1.5 / 3,
      "auc": ((1 - 1 / 4) + 1 + (1 - 5.5 / 6)) / 3})
  for entry in (shop, cold_users, cold_items, results["shop/sampled"]):
    for metric in ("hr@1", "ndcg@5", "recall@5", "mrr@5", "auc"):
      assert entry["baseline_" + metric] == entry[metric]
  # Films (rating): ours a constant 3; the item mean shrunk by 5 pseudo-ratings at 10/3.
  mean = 10 / 3
  item_mean = {"f0": (8 + 5 * mean) / 7, "f1": (2 + 5 * mean) / 6, "f2": mean}
  labels, base = np.array([4.0, 1.0, 3.0]), np.array([item_mean[f] for f in ("f0", "f1", "f2")])
  films = results["films"]
  assert films["n"] == 3 and films["rmse"] == pytest.approx(np.sqrt(5 / 3))
  assert films["baseline_rmse"] == pytest.approx(np.sqrt(np.mean((base - labels) ** 2)))
  assert films["baseline_mae"] == pytest.approx(np.mean(np.abs(base - labels)))
  assert results["films/cold_users"] == pytest.approx({          # c5 -> f1, label 1
      "n": 1, "rmse": 2.0, "mae": 2.0, "baseline_rmse": base[1] - 1, "baseline_mae": base[1] - 1})
  assert results["films/cold_items"]["n"] == 3                      # f0 2, f1 1, f2 0 ratings


def test_cf_rows_rank_against_the_same_negatives_and_the_table_names_the_protocol(toy):
  counts = toy.item_counts()
  model = Fixed(toy, np.zeros(toy.num_items))
  model.cf = {"item_knn": bl.ItemKNN(k=5, shrink=0.0).fit(toy), "popularity_copy": Fixed(toy, counts)}
  results = evaluation.evaluate_model(model, toy, "test", _config())
  sampled = results["shop/sampled"]
  for metric in ("hr@1", "ndcg@5", "mrr@5", "auc"):   # the same scores, the same negatives
    assert sampled["popularity_copy_" + metric] == sampled["baseline_" + metric]
  assert "item_knn_hr@5" in results["shop"] and "item_knn_hr@5" not in results["films"]
  table = evaluation.format_table(results)
  assert "full-catalog ranking: each target among all items of its domain" in table
  assert "sampled ranking: each target among 3 negatives of its domain" in table
  assert table.index("full-catalog") < table.index("shop/cold_items") < table.index("sampled")
  assert "popularity" in table and "item-kNN" in table and "item mean" in table
  assert "HR@5" in table and "MRR@1" in table
  off = evaluation.evaluate_model(model, toy, "test", _config(negatives=0))
  assert not any("sampled" in k for k in off) and "sampled ranking" not in evaluation.format_table(off)


def test_end_to_end_item_mean_is_the_baselines_item_mean(toy):
  train = toy.mask(("train",))
  counts = np.bincount(toy.item[train], minlength=toy.num_items).astype(float)
  sums = np.bincount(toy.item[train], toy.label[train], minlength=toy.num_items)
  domain = toy.domain_of_item()
  catalog = types.SimpleNamespace(
      domains=("shop", "films"), domain=domain,
      rows_of_domain=[np.flatnonzero(domain == d) for d in range(2)],
      row={(toy.names[d], i): int(toy.offsets[d]) + c for d, ids in enumerate(toy.item_ids)
           for c, i in enumerate(ids)})
  base = evaluation.Baselines(catalog, counts, sums)
  q = toy.queries("test", 1)
  records = [{"domain": "films", "item_id": toy.item_ids[1][i - toy.offsets[1]]} for i in q.item]
  np.testing.assert_allclose(base.item_mean(records), bl.ItemMean().fit(toy).score_pairs(q),
                             rtol=1e-6)
  assert base.domain_mean[1] == pytest.approx(10 / 3)


def test_eval_settings_are_checked_and_best_metric_needs_an_evaluated_k():
  from crossrec_jax import config_check  # pylint: disable=import-outside-toplevel
  from crossrec_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  config_check.validate_config(_config(ks=(10, 20)))
  for field, value, match in (("ks", (), "--config.eval.ks"), ("ks", (0, 10), "--config.eval.ks"),
                              ("sampled_negatives", -1, "--config.eval.sampled_negatives")):
    bad = _config(ks=(10, 20))
    bad.eval[field] = value
    with pytest.raises(ConfigError, match=match):
      config_check.validate_config(bad)
  ok = _config(ks=(10, 20))
  ok.best_metric = "music/sampled/cold_users/mrr@20"
  config_check.validate_config(ok)
  ok.best_metric = "music/ndcg@5"
  with pytest.raises(ConfigError, match="K=5 is not evaluated"):
    config_check.validate_config(ok)
  assert evaluation.EvalSettings.from_config() == evaluation.EvalSettings((10, 20), 0, 0, 2)
