"""Ranking metrics with hand-computed values: the rank of a target on device in blocks
(ranking.py; ties count half, excluded items and the target), among sampled negatives, HR / NDCG /
Recall / MRR at several K and AUC (metrics.py); and the end-to-end evaluator's exclusion of each
user's earlier items."""

import types

import numpy as np
import pytest
import scipy.sparse as sp

from crossrec_jax import evaluation, metrics, ranking

# 12 items, so that a rank can fall outside the top 10.
SCORES = np.array([
    # A: the target (item 0) is strictly best; its own exclusion is ignored.
    [0.9, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2, 0.3, 0.1, 0.2],
    # B: 10 items strictly above the target (item 11), one below.
    [0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5, 0.4, 0.0, 0.3],
    # C: target item 3 (0.5); items 0-2 above, 4-5 tied, 6-11 below. Items 0 and 4 excluded.
    [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    # D: a constant scorer: 11 ties count half -> the expected rank 5.5, AUC 0.5.
    [0.3] * 12,
], np.float32)
TARGET = np.array([0, 11, 3, 7])
EXCLUDE = np.zeros(SCORES.shape, bool)
EXCLUDE[0, 0] = True                # the target is never excluded
EXCLUDE[2, [0, 4]] = True
# A: rank 0 of 12. B: rank 10 of 12. C: 2 above (1, 2) + 1 tie (5) / 2 = 2.5 of 10. D: 5.5 of 12.
RANK, CANDIDATES = [0.0, 10.0, 2.5, 5.5], [12, 12, 10, 12]
HR10 = (1 + 0 + 1 + 1) / 4
NDCG10 = (1 + 0 + 1 / np.log2(2 + 2) + 1 / np.log2(5 + 2)) / 4   # ties: floor of the rank
AUC = ((1 - 0 / 11) + (1 - 10 / 11) + (1 - 2.5 / 9) + (1 - 5.5 / 11)) / 4


def test_device_ranks_in_blocks_equal_the_hand_values():
  rank, candidates = ranking.rank_of_targets(SCORES, TARGET, sp.csr_matrix(EXCLUDE), block=3)
  np.testing.assert_array_equal(rank, RANK)
  np.testing.assert_array_equal(candidates, CANDIDATES)


def test_ranks_among_sampled_negatives_by_hand():
  # A: target 0 (0.9) against 3, 5, 7 (0.3, 0.2, 0.1): first. C: target 3 (0.5) against 0 and 1
  # (1.0 above) and 4 (a tie), one padding slot. D: constant, target 7 against 4: 2 of 5.
  negatives = np.array([[3, 5, 7, -1], [0, 1, 4, -1], [0, 1, 2, 4]], np.int32)
  rank, candidates = ranking.rank_among_negatives(SCORES[[0, 2, 3]], TARGET[[0, 2, 3]],
                                                  negatives, block=2)
  np.testing.assert_array_equal(rank, [0.0, 2.5, 2.0])
  np.testing.assert_array_equal(candidates, [4, 4, 5])


def test_hr_ndcg_auc_at_10_by_hand():
  got = metrics.ranking_metrics(np.array(RANK), np.array(CANDIDATES), k=10)
  assert got == pytest.approx({"hr@10": HR10, "ndcg@10": NDCG10, "auc": AUC, "recall@10": HR10,
                               "mrr@10": (1 + 0 + 1 / 3 + 1 / 6) / 4}, abs=1e-12)
  device = ranking.ranking_metrics(SCORES, TARGET, sp.csr_matrix(EXCLUDE), k=10)
  assert device == pytest.approx(got | {"n": 4}, abs=1e-6)
  # A single candidate is a sure hit (AUC 1, no division by zero).
  assert metrics.ranking_metrics(np.array([0.0]), np.array([1.0]), k=10) == {
      "hr@10": 1.0, "ndcg@10": 1.0, "recall@10": 1.0, "mrr@10": 1.0, "auc": 1.0}


def test_metrics_at_several_k_by_hand():
  # Users a (two targets), b, c (two targets); ranks 0, 2.5 | 9.5 | 15, 4 (ties: floor places).
  rank, candidates = np.array([0.0, 2.5, 9.5, 15.0, 4.0]), np.full(5, 21.0)
  users = np.array(["a", "a", "b", "c", "c"])
  got = metrics.ranking_metrics(rank, candidates, (1, 5, 10), users)
  ndcg = 1 / np.log2(np.array([0, 2, 9, 15, 4]) + 2)
  want = {"hr@1": 1 / 5, "ndcg@1": 1 / 5, "mrr@1": 1 / 5, "recall@1": (1 / 2 + 0 + 0) / 3,
          "hr@5": 3 / 5, "ndcg@5": (ndcg[0] + ndcg[1] + ndcg[4]) / 5,
          "mrr@5": (1 + 1 / 3 + 1 / 5) / 5, "recall@5": (1 + 0 + 1 / 2) / 3,
          "hr@10": 4 / 5, "ndcg@10": (ndcg.sum() - ndcg[3]) / 5,
          "mrr@10": (1 + 1 / 3 + 1 / 10 + 1 / 5) / 5, "recall@10": (1 + 1 + 1 / 2) / 3,
          "auc": float(np.mean(1 - rank / 20))}
  assert got == pytest.approx(want, abs=1e-12)
  # Every target its own user: Recall@K is HR@K.
  alone = metrics.ranking_metrics(rank, candidates, (1, 5, 10))
  assert [alone[f"recall@{k}"] for k in (1, 5, 10)] == [want[f"hr@{k}"] for k in (1, 5, 10)]


def _evaluator():
  """An Evaluator reduced to what its ranking reads: a catalog of books rows 0-2 and music
  rows 3-6 (m0..m3), music implicit."""
  ev = object.__new__(evaluation.Evaluator)
  ev.catalog = types.SimpleNamespace(
      rows_of_domain=[np.array([0, 1, 2]), np.array([3, 4, 5, 6])],
      row={("books", "b0"): 0, ("books", "b1"): 1, ("books", "b2"): 2, ("music", "m0"): 3,
           ("music", "m1"): 4, ("music", "m2"): 5, ("music", "m3"): 6})
  ev.model_config = types.SimpleNamespace(domains=[types.SimpleNamespace(name="books"),
                                                   types.SimpleNamespace(name="music")])
  return ev


def test_evaluator_excludes_each_users_earlier_items_of_the_domain():
  scores = np.array([[0.9, 0.5, 0.8, 0.1], [0.9, 0.5, 0.8, 0.1], [0.9, 0.5, 0.8, 0.1]])
  records = [{"history_items": ["m0", "m2"]},     # both above the target m1: left out -> rank 0
             {"history_items": ["b0", "zz"]},     # another domain's id / unknown id: no effect
             {"history_items": ["m2", "m1"]}]     # the target m1 itself is never excluded
  item_rows = np.array([4, 6, 4])                 # targets m1, m3, m1
  target, exclude = _evaluator()._targets(1, records, item_rows)  # pylint: disable=protected-access
  np.testing.assert_array_equal(target, [1, 3, 1])
  rank, candidates = ranking.rank_of_targets(scores, target, exclude)
  # Ranks: 0 of 2 candidates; 3 of 4; m0 above, m2 out -> 1 of 3.
  np.testing.assert_array_equal(rank, [0, 3, 1])
  np.testing.assert_array_equal(candidates, [2, 4, 3])


def test_paired_difference_by_hand():
  hit_a, ndcg_a = metrics.per_target_hits(np.array([0.0, 1.0, 10.0, 3.5]), 10)
  np.testing.assert_allclose(hit_a, [1, 1, 0, 1])
  np.testing.assert_allclose(ndcg_a, [1.0, 1 / np.log2(3), 0.0, 1 / np.log2(5)])
  mean, se = metrics.paired_difference([1, 0, 1, 1], [0, 0, 1, 0])
  assert mean == 0.5
  assert se == pytest.approx(np.sqrt(1 / 3) / 2)   # sd of [1, 0, 0, 1] (ddof 1) over sqrt(4)
