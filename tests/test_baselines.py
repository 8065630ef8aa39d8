"""crossrec_jax.baselines: each model against hand-computed values or its closed form, on toy
interaction logs, and the shared interface (pairs agree with the catalog, unknown users)."""

import math

import numpy as np
import pytest
import scipy.sparse as sp

from crossrec_jax import baselines as bl
from crossrec_jax.interactions import InteractionData

SHOP = {"name": "shop", "task": "implicit", "min_rating": 0.0, "max_rating": 1.0}
READ = {"name": "read", "task": "implicit", "min_rating": 0.0, "max_rating": 1.0}
FILMS = {"name": "films", "task": "rating", "min_rating": 1.0, "max_rating": 5.0}


def make_data(specs, item_ids, rows):
  """rows: (user key, domain name, item id, label, split); order is the row's position."""
  users, domains, items, labels, splits = zip(*rows)
  return InteractionData.from_columns(
      specs, item_ids, [[f"text of {i}" for i in ids] for ids in item_ids], user_key=users,
      domain=domains, item_id=items, label=labels, order=np.arange(len(rows)), split=splits)


@pytest.fixture(name="toy")
def fixture_toy():
  """4 train users over shop (a, b, c) and read (x, y); u5 is cold with one read item."""
  train = {"u1": "abx", "u2": "acx", "u3": "bcy", "u4": "aby"}
  rows = [(u, "read" if i in "xy" else "shop", i, 1.0, "train") for u, its in train.items()
          for i in its]
  rows += [("u5", "read", "x", 1.0, "history"), ("u5", "shop", "b", 1.0, "test"),
           ("u1", "shop", "c", 1.0, "test"), ("u2", "shop", "a", 1.0, "test")]
  return make_data([SHOP, READ], [list("abc"), list("xy")], rows)


def rating_data(truth, seen, held):
  """An explicit domain from a dense [users, items] matrix: seen -> train, held -> test."""
  rows = []
  for split, mask in (("train", seen), ("test", held)):
    for u, i in zip(*np.nonzero(mask)):
      rows.append((f"u{u:03d}", "films", f"f{i:03d}", float(truth[u, i]), split))
  return make_data([FILMS], [[f"f{i:03d}" for i in range(truth.shape[1])]], rows)


def low_rank_ratings(seed=0, users=60, items=50, rank=2):
  rng = np.random.default_rng(seed)
  truth = 3.0 + rng.normal(0, 0.3, (users, 1)) + rng.normal(0, 0.3, (1, items)) + \
      rng.normal(0, 0.7, (users, rank)) @ rng.normal(0, 0.7, (rank, items))
  seen = rng.random((users, items)) < 0.7
  return np.clip(truth, 1.0, 5.0), seen, ~seen


def rmse(model, queries):
  return float(np.sqrt(np.mean((model.score_pairs(queries) - queries.label) ** 2)))


# ------------------------------------------------------------------------------- ranking

def test_popularity_counts_train_interactions_only(toy):
  model = bl.Popularity().fit(toy)
  queries = toy.queries("test", 0)
  np.testing.assert_array_equal(model.score_catalog(queries, 0), [[3, 3, 2]] * 3)
  np.testing.assert_array_equal(model.score_catalog(queries, 1), [[2, 2]] * 3)
  np.testing.assert_array_equal(model.score_pairs(queries), [3, 2, 3])  # b, c, a


def test_item_knn_scores_by_hand(toy):
  # n: a 3, b 3, c 2, x 2, y 2; c(a,x) = 2, c(b,x) = 1, c(c,x) = 1, c(a,b) = 2.
  cold = toy.queries("test", 0).subset(np.array([True, False, False]))  # u5, context {x}
  assert cold.user[0] == -1
  full = bl.ItemKNN(k=10, shrink=0.0).fit(toy)
  np.testing.assert_allclose(full.score_catalog(cold, 0),
                             [[2 / math.sqrt(6), 1 / math.sqrt(6), 1 / 2]], rtol=1e-6)
  shrunk = bl.ItemKNN(k=10, shrink=1.0).fit(toy)
  np.testing.assert_allclose(shrunk.score_catalog(cold, 0), [[
      2 / (math.sqrt(6) + 1), 1 / (math.sqrt(6) + 1), 1 / 3]], rtol=1e-6)
  # k=1 keeps each column's single most similar item: a -> x, b -> y, c -> x (x, y tie at
  # 1/2: the lower index wins). So context {x} scores a and c, context {y} only b.
  top1 = bl.ItemKNN(k=1, shrink=0.0).fit(toy)
  np.testing.assert_allclose(top1.score_catalog(cold, 0), [[2 / math.sqrt(6), 0, 1 / 2]],
                             rtol=1e-6)
  sim = top1.similarity.toarray()
  assert np.count_nonzero(sim[:, :3], axis=0).tolist() == [1, 1, 1]
  assert sim[4, 1] == pytest.approx(2 / math.sqrt(6)) and np.all(np.diag(sim) == 0)
  assert top1.score_pairs(cold)[0] == 0.0  # target b: its only neighbour y is not in context


def test_item_knn_pruning_matches_a_dense_reference():
  rng = np.random.default_rng(0)
  X = (rng.random((80, 30)) < 0.2).astype(float)
  counts = X.T @ X
  np.fill_diagonal(counts, 0)
  n = X.sum(0)
  rows = [(f"u{u}", "shop", f"i{i:02d}", 1.0, "train") for u, i in zip(*np.nonzero(X))]
  data = make_data([SHOP], [[f"i{i:02d}" for i in range(30)]], rows)
  cooc = bl.ItemCooccurrence.from_data(data)
  for k, shrink in ((3, 0.0), (5, 10.0), (3, 10.0), (100, 2.0)):
    dense = counts / (np.sqrt(np.outer(n, n)) + shrink)
    expected = np.zeros_like(dense)
    for j in range(30):
      keep = np.lexsort((np.arange(30), -dense[:, j]))[:k]
      expected[keep, j] = dense[keep, j]
    expected[counts == 0] = 0
    shared = bl.ItemKNN(k, shrink, cooccurrence=cooc).fit(data).similarity.toarray()
    np.testing.assert_allclose(shared, expected, rtol=1e-6, err_msg=f"k={k} shrink={shrink}")
    fresh = bl.ItemKNN(k, shrink).fit(data).similarity.toarray()
    np.testing.assert_array_equal(fresh, shared)
  other = make_data([SHOP], [[f"i{i:02d}" for i in range(30)]], rows[:-1])
  with pytest.raises(ValueError, match="other data"):
    bl.ItemKNN(3, 0.0, cooccurrence=cooc).fit(other)


def test_text_knn_matches_a_dense_reference_and_scores_items_nobody_touched():
  rng = np.random.default_rng(1)
  vectors = rng.normal(size=(12, 5)).astype(np.float32)
  vectors[11] = vectors[3] + 0.01  # item i11 reads like i03 and has no interaction at all
  ids = [f"i{i:02d}" for i in range(12)]
  rows = [(f"u{u}", "shop", f"i{i:02d}", 1.0, "train") for u in range(6) for i in range(u, u + 3)]
  rows += [("u9", "shop", "i03", 1.0, "history"), ("u9", "shop", "i11", 1.0, "test")]
  data = make_data([SHOP], [ids], rows)
  model = bl.TextKNN(vectors, k=4, block=5).fit(data)  # blocks of 5: the last one is padded
  # Candidates streamed in column blocks of 5 (the top-k merged across them): the same graph.
  streamed = bl.TextKNN(vectors, k=4, block=5, column_block=5).fit(data)
  np.testing.assert_allclose(streamed.similarity.toarray(), model.similarity.toarray(), atol=1e-6)
  v = vectors - vectors.mean(0)
  v /= np.linalg.norm(v, axis=1, keepdims=True)
  cos = v @ v.T
  np.fill_diagonal(cos, -np.inf)
  expected = np.zeros((12, 12))
  for j in range(12):
    keep = np.argsort(-cos[:, j], kind="stable")[:4]
    expected[keep, j] = np.maximum(cos[keep, j], 0)
  np.testing.assert_allclose(model.similarity.toarray(), expected, atol=1e-5)
  test = data.queries("test", 0)
  scores = model.score_catalog(test, 0)
  np.testing.assert_allclose(scores, test.context.toarray() @ expected, atol=1e-5)
  assert np.argmax(np.where(np.arange(12) == 3, -np.inf, scores[0])) == 11
  with pytest.raises(ValueError, match="11 text vectors for 12 items"):
    bl.TextKNN(vectors[:11]).fit(data)


def test_ease_matches_the_closed_form_and_ranks_untouched_items_last():
  rng = np.random.default_rng(0)
  dense = (rng.random((40, 12)) < 0.3).astype(float)
  dense[:, 5] = 0  # nobody touched item 5: it stays out of the solve
  active, B = bl.ease_weights(sp.csr_matrix(dense), lam=3.0)
  assert 5 not in active and len(active) == 11
  Xa = dense[:, active]
  P = np.linalg.inv(Xa.T @ Xa + 3.0 * np.eye(len(active)))
  np.testing.assert_allclose(B, np.eye(len(active)) - P / np.diag(P), atol=1e-5)
  assert np.all(np.diag(B) == 0)

  rows = [(f"u{u}", "shop", f"i{i:02d}", 1.0, "train") for u, i in zip(*np.nonzero(dense))]
  rows += [("new", "shop", "i01", 1.0, "history"), ("new", "shop", "i03", 1.0, "history"),
           ("new", "shop", "i07", 1.0, "test")]
  data = make_data([SHOP], [[f"i{i:02d}" for i in range(12)]], rows)
  model = bl.EASE(lam=3.0).fit(data)
  queries = data.queries("test", 0)
  assert queries.user[0] == -1  # scored from the context alone
  scores = model.score_catalog(queries, 0)[0]
  history = np.zeros(len(active))
  history[np.searchsorted(active, [1, 3])] = 1.0
  np.testing.assert_allclose(scores[active], history @ B, rtol=1e-5, atol=1e-6)
  assert scores[5] == bl.ranking.LOWEST_SCORE and scores[5] < scores[active].min()


def test_ease_past_max_items_fits_the_most_popular_with_a_notice(capsys):
  rng = np.random.default_rng(0)
  dense = (rng.random((60, 12)) < 0.3).astype(float)
  dense[:, 2] = 1.0
  dense[:40, 7] = 1.0  # items 2 and 7 are the two most popular
  dense[:, 5] = 0
  active, B = bl.ease_weights(sp.csr_matrix(dense), lam=3.0, max_items=4, name="shop")
  out = capsys.readouterr().out
  assert "EASE in domain shop: 11 items have train interactions; fitting on the 4 most popular" in out
  assert "fusion.ease_max_items" in out
  counts = dense.sum(0)
  np.testing.assert_array_equal(active, np.sort(np.argsort(-counts, kind="stable")[:4]))
  assert {2, 7} <= set(active.tolist())
  ref_active, ref_B = bl.ease_weights(sp.csr_matrix(dense[:, active]), lam=3.0, max_items=0)
  np.testing.assert_array_equal(ref_active, np.arange(4))
  np.testing.assert_allclose(B, ref_B, rtol=1e-5, atol=1e-6)
  # Through the model: the items left out score lowest, the kept ones as the bounded solve says.
  rows = [(f"u{u}", "shop", f"i{i:02d}", 1.0, "train") for u, i in zip(*np.nonzero(dense))]
  rows += [("new", "shop", "i02", 1.0, "history"), ("new", "shop", "i01", 1.0, "test")]
  data = make_data([SHOP], [[f"i{i:02d}" for i in range(12)]], rows)
  scores = bl.EASE(lam=3.0, max_items=4).fit(data).score_catalog(data.queries("test", 0), 0)[0]
  left_out = np.setdiff1d(np.arange(12), active)
  assert np.all(scores[left_out] == bl.ranking.LOWEST_SCORE)
  np.testing.assert_allclose(scores[active], B[list(active).index(2)], rtol=1e-5, atol=1e-6)


def test_ease_too_big_for_the_memory_is_a_one_line_error_before_lapack(monkeypatch):
  monkeypatch.setattr(bl.ranking, "available_memory", lambda: 1000)
  dense = (np.random.default_rng(0).random((30, 20)) < 0.4).astype(float)
  with pytest.raises(MemoryError, match=r"EASE in domain shop on 20 items needs about .* GiB "
                     r"and 0\.0 GiB is free: lower fusion\.ease_max_items"):
    bl.ease_weights(sp.csr_matrix(dense), lam=3.0, name="shop")


def test_bpr_learns_groups_and_gives_unknown_users_the_item_biases():
  # Two taste groups over disjoint halves of one domain's catalog.
  rows = [(f"u{u}", "shop", f"i{i:02d}", 1.0, "train") for u in range(40)
          for i in (range(0, 10) if u < 20 else range(10, 20)) if (u + i) % 3]
  rows += [("u0", "shop", "i00", 1.0, "test"), ("cold", "shop", "i03", 1.0, "test")]
  data = make_data([SHOP], [[f"i{i:02d}" for i in range(20)]], rows)
  model = bl.BPR(dim=8, epochs=60, lr=0.05, l2=1e-4, seed=0, batch_size=64).fit(data)
  queries = data.queries("test", 0)
  scores = model.score_catalog(queries, 0)
  assert scores[0, :10].mean() > scores[0, 10:].mean() + 1.0
  np.testing.assert_allclose(scores[1], model.params["bias"], rtol=1e-6)


# -------------------------------------------------------------------------------- rating

def explicit_toy():
  rows = [("u1", "films", "p", 5.0, "train"), ("u2", "films", "p", 3.0, "train"),
          ("u1", "films", "q", 2.0, "train"), ("u3", "films", "q", 1.0, "train"),
          ("u2", "films", "q", 3.0, "test"), ("u4", "films", "p", 4.0, "test"),
          ("u4", "films", "r", 4.0, "test")]
  return make_data([FILMS], [list("pqr")], rows)


def test_item_mean_shrinks_towards_the_domain_mean():
  data = explicit_toy()  # train: p (5, 3), q (2, 1); domain mean 11 / 4; r unrated
  queries = data.queries("test", 0, context="all")
  pred = bl.ItemMean(shrink=2.0).fit(data).score_pairs(queries)
  mean = 11 / 4
  expected_q, expected_p = (3 + 2 * mean) / 4, (8 + 2 * mean) / 4
  np.testing.assert_allclose(pred, [expected_q, expected_p, mean], rtol=1e-6)
  unshrunk = bl.ItemMean(shrink=0.0).fit(data).score_pairs(queries)
  np.testing.assert_allclose(unshrunk, [3 / 2, 4, mean], rtol=1e-6)  # unrated r: still the mean


def test_user_item_bias_is_the_joint_ridge_solution():
  truth, seen, held = low_rank_ratings(users=15, items=12)
  data = rating_data(truth, seen, held)
  reg = 2.0
  model = bl.UserItemBias(reg=reg, sweeps=300).fit(data)
  sel = data.mask(("train",))
  u, i, r = data.user[sel], data.item[sel], data.label[sel]
  design = np.hstack([np.eye(data.num_users)[u], np.eye(data.num_items)[i]])
  lhs = design.T @ design + reg * np.eye(design.shape[1])
  b = np.linalg.solve(lhs, design.T @ (r - r.mean()))
  queries = data.queries("test", 0, context="all")
  expected = np.clip(r.mean() + b[queries.user] + b[data.num_users + queries.item], 1, 5)
  np.testing.assert_allclose(model.score_pairs(queries), expected, rtol=1e-5)


def test_biased_mf_recovers_a_low_rank_rating_matrix_and_unknown_users_get_item_terms():
  truth, seen, held = low_rank_ratings()
  data = rating_data(truth, seen, held)
  queries = data.queries("test", 0, context="all")
  mf = bl.BiasedMF(rank=2, reg=0.01).fit(data)
  bias = bl.UserItemBias(reg=1.0).fit(data)
  assert rmse(mf, queries) < 0.1 and rmse(bias, queries) > 0.5, (rmse(mf, queries),
                                                                  rmse(bias, queries))
  terms = mf.per_domain[0]
  unknown = queries.subset(np.arange(len(queries)) < 5)
  unknown.user[:] = -1
  np.testing.assert_allclose(mf.score_pairs(unknown),
                             np.clip(terms.mean + terms.item_bias[unknown.item], 1, 5), rtol=1e-5)


def test_als_half_sweep_is_each_entity_ridge_solve():
  rng = np.random.default_rng(0)
  rows, cols = np.nonzero(rng.random((7, 9)) < 0.5)
  rows = np.concatenate([rows, [2]])  # a repeated rating counts twice
  cols = np.concatenate([cols, [cols[rows[:-1] == 2][0]]])
  target = rng.normal(size=len(rows))
  other = rng.normal(size=(9, 4))  # [q (rank 3), b]
  pattern = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(8, 9))  # row 7: no ratings
  solved = bl.rating._ridge_per_row(pattern, rows, cols, target, other, reg=0.3, bias_reg=2.0)
  for e in range(7):
    mine = rows == e
    x = np.hstack([other[cols[mine], :3], np.ones((mine.sum(), 1))])
    penalty = np.diag([0.3 * mine.sum()] * 3 + [2.0])
    np.testing.assert_allclose(solved[e], np.linalg.solve(x.T @ x + penalty, x.T @ target[mine]),
                               rtol=1e-8)
  np.testing.assert_array_equal(solved[7], 0.0)


def test_autorec_beats_the_biases_and_falls_back_to_them():
  truth, seen, held = low_rank_ratings(seed=1)
  data = rating_data(truth, seen, held)
  queries = data.queries("test", 0, context="all")
  model = bl.AutoRec(hidden=32, l2=1.0, steps=300, lr=1e-2, seed=0).fit(data)
  bias = bl.UserItemBias(reg=5.0).fit(data)
  assert rmse(model, queries) < 0.8 * rmse(bias, queries), (rmse(model, queries),
                                                            rmse(bias, queries))
  unknown = queries.subset(np.arange(len(queries)) < 5)
  unknown.user[:] = -1
  np.testing.assert_allclose(model.score_pairs(unknown), bias.score_pairs(unknown), rtol=1e-5)
  assert np.all((model.score_catalog(queries, 0) >= 1) & (model.score_catalog(queries, 0) <= 5))


def test_rating_models_refuse_implicit_domains(toy):
  model = bl.UserItemBias().fit(toy)
  with pytest.raises(ValueError, match="'shop' is implicit"):
    model.score_pairs(toy.queries("test", 0))


@pytest.mark.parametrize("make", [
    lambda: bl.ItemMean(), lambda: bl.UserItemBias(), lambda: bl.BiasedMF(rank=3, sweeps=3),
    lambda: bl.AutoRec(hidden=8, steps=5)], ids=["item_mean", "bias", "mf", "autorec"])
def test_rating_pairs_agree_with_the_catalog(make):
  truth, seen, held = low_rank_ratings(users=12, items=9)
  data = rating_data(truth, seen, held)
  queries = data.queries("test", 0, context="all")
  queries.user[:3] = -1
  model = make().fit(data)
  catalog = model.score_catalog(queries, 0)
  assert catalog.shape == (len(queries), 9) and catalog.dtype == np.float32
  np.testing.assert_allclose(model.score_pairs(queries),
                             catalog[np.arange(len(queries)), queries.item], rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: bl.Popularity(), lambda: bl.ItemKNN(k=2, shrink=1.0), lambda: bl.EASE(lam=1.0),
    lambda: bl.BPR(dim=4, epochs=2, batch_size=4)], ids=["pop", "knn", "ease", "bpr"])
def test_ranking_pairs_agree_with_the_catalog(make, toy):
  queries = toy.queries("test", 0)
  model = make().fit(toy)
  catalog = model.score_catalog(queries, 0)
  assert catalog.shape == (3, 3) and catalog.dtype == np.float32
  np.testing.assert_allclose(model.score_pairs(queries), catalog[np.arange(3), queries.item],
                             rtol=1e-6)


# ------------------------------------------------------------------- evaluation and tuning

def test_evaluate_ranking_excludes_earlier_items_and_counts_ties_half(toy):
  queries = toy.queries("test", 0)  # u5 -> b (no earlier shop item), u1 -> c, u2 -> a
  earlier = bl.domain_exclusions(queries, toy.offsets, 0)
  np.testing.assert_array_equal(earlier, [[0, 0, 0], [1, 1, 0], [1, 0, 1]])
  scores = np.array([[0.5, 0.5, 0.9], [0.9, 0.9, 0.1], [0.2, 0.9, 0.9]], np.float32)
  result = bl.evaluate_ranking(scores, queries, toy, 0, k=1)
  # u5 -> b: c above, a tied: rank 1.5 of 3 candidates. u1 -> c: a and b excluded, alone:
  # rank 0 of 1. u2 -> a: c excluded (the target never is), b above: rank 1 of 2.
  assert result["n"] == 3
  assert result["hr@1"] == pytest.approx(1 / 3)
  assert result["auc"] == pytest.approx(((1 - 1.5 / 2) + 1 + 0) / 3)
  with pytest.raises(ValueError):
    bl.evaluate_ranking(scores, queries, toy, 1)  # the queries are of domain 0


def test_tune_returns_the_best_grid_point_by_mode():
  truth, seen, held = low_rank_ratings(users=30, items=20)
  data = bl.holdout_split(rating_data(truth, seen, held), fraction=0.2, seed=0)
  valid = data.queries("valid", 0, context="all")
  grid = [{"reg": g} for g in (0.0, 3.0, 1000.0)]
  best, results = bl.tune(bl.UserItemBias, grid, data, valid, bl.rmse_metric, mode="min")
  values = [v for _, v in results]
  assert [p for p, _ in results] == grid and best == grid[int(np.argmin(values))]
  assert best == {"reg": 3.0}
  worst, _ = bl.tune(bl.UserItemBias, grid, data, valid, bl.rmse_metric, mode="max")
  assert worst == grid[int(np.argmax(values))]
  with pytest.raises(ValueError):
    bl.tune(bl.UserItemBias, grid, data, valid, bl.rmse_metric, mode="best")


def test_tune_with_a_ranking_metric(toy):
  grid = [{"k": 1, "shrink": 0.0}, {"k": 10, "shrink": 0.0}]
  best, results = bl.tune(bl.ItemKNN, grid, toy, toy.queries("test", 0),
                          bl.ranking_metric(toy, 0, "hr@1"))
  assert len(results) == 2 and best == max(results, key=lambda x: x[1])[0]


def test_holdout_split_moves_a_fraction_of_train_rows():
  truth, seen, held = low_rank_ratings(users=30, items=20)
  data = rating_data(truth, seen, held)
  split = bl.holdout_split(data, fraction=0.25, seed=3)
  train = data.split == "train"
  moved = split.split != data.split
  assert moved.sum() == round(0.25 * train.sum()) and np.all(train[moved])
  assert np.all(split.split[moved] == "valid") and np.all(data.split != "valid")
  np.testing.assert_array_equal(bl.holdout_split(data, 0.25, seed=3).split, split.split)
  assert not np.array_equal(bl.holdout_split(data, 0.25, seed=4).split, split.split)
  with pytest.raises(ValueError, match="already has a valid split"):
    bl.holdout_split(split)
