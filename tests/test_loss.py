"""The multi-task loss by hand: rating MSE on the normalised scale, BCE on implicit rows, the
in-batch softmax with its candidate mask (same domain, no padding rows, no other copy of the
positive's item) and the logQ correction; padded rows count nowhere."""

import types

import numpy as np
import pytest

from crossrec_jax.training import steps

# Domain 0: ratings 1-5; domain 1: implicit.
TABLES = steps.TaskTables(is_rating=(True, False), low=(1.0, 0.0), high=(5.0, 1.0), weight=(1.0, 1.0))
IDENTITY = types.SimpleNamespace(head=types.SimpleNamespace(project_users=lambda u: u,
                                                            project_items=lambda i: i))
# Rows: 0-2 books (row 2 rates the same item as row 0), 3-5 music (row 4 is padding).
DOMAIN = np.array([0, 0, 0, 1, 1, 1], np.int32)
LABEL = np.array([5.0, 2.0, 4.0, 1.0, 0.0, 0.0], np.float32)
WEIGHT = np.array([1, 1, 1, 1, 0, 1], np.float32)
ITEM_ROW = np.array([10, 11, 10, 20, 21, 22], np.int32)
LOG_Q = np.array([0.1, 0.2, 0.1, 0.3, 0.0, 0.5], np.float32)
RATING = np.array([4.0, 2.5, 4.0, 9.0, 9.0, 9.0], np.float32)      # music rows: never read
LOGIT = np.array([50.0, 50.0, 50.0, 0.3, 100.0, -0.2], np.float32)  # books rows, padding: never read
# One-dimensional retrieval vectors; the other domain's projection (7 / 5) must never be read.
USER = np.array([[1.0, 7], [0.5, 7], [2.0, 7], [7, 1.0], [7, 0.0], [7, 3.0]], np.float32)[..., None]
ITEM = np.array([[0.2, 5], [-0.4, 5], [0.1, 5], [5, 0.5], [5, 9.0], [5, -1.0]], np.float32)[..., None]


def _loss(logq=True, domain_weight=(1.0, 1.0), inbatch_weight=1.0):
  tables = steps.TaskTables(TABLES.is_rating, TABLES.low, TABLES.high, domain_weight)
  batch = {"domain": DOMAIN, "label": LABEL, "weight": WEIGHT, "item_row": ITEM_ROW,
           "item_log_q": LOG_Q}
  out = {"rating": RATING, "logit": LOGIT, "user": USER, "item": ITEM}
  config = types.SimpleNamespace(rating_weight=10.0, bce_weight=1.0, inbatch_weight=inbatch_weight,
                                 inbatch_temperature=1.0, logq_correction=logq,
                                 rating_positive_threshold=0.75)
  loss, parts = steps.multitask_loss(IDENTITY, out, batch, tables, config)
  return float(loss), {k: float(v) for k, v in parts.items()}


def lse(*x):
  return float(np.log(np.sum(np.exp(x))))


# Rating rows: errors -1, 0.5, 0 on a scale of 4.
MSE = ((1 / 4) ** 2 + (0.5 / 4) ** 2 + 0) / 3
# Music rows 3 (label 1, logit 0.3) and 5 (label 0, logit -0.2); row 4 is padding.
BCE = (np.log1p(np.exp(-0.3)) + np.log1p(np.exp(-0.2))) / 2
# Positives: rows 0 ((5-1)/4 = 1), 2 ((4-1)/4 = 0.75) and 3 (label 1); row 1 (0.25) is not.
# logit[b, c] = user_b * item_c - logQ_c over the candidates c of b:
#   row 0: itself (0.2 - 0.1) and row 1 (-0.4 - 0.2); row 2 has the same item: not a negative.
#   row 2: itself (2 * 0.1 - 0.1) and row 1 (2 * -0.4 - 0.2); row 0 has the same item.
#   row 3: itself (0.5 - 0.3) and row 5 (-1 - 0.5); row 4 is padding.
SOFTMAX = [lse(0.1, -0.6) - 0.1, lse(0.1, -1.0) - 0.1, lse(0.2, -1.5) - 0.2]
SOFTMAX_NO_LOGQ = [lse(0.2, -0.4) - 0.2, lse(0.2, -0.8) - 0.2, lse(0.5, -1.0) - 0.5]


def test_rating_and_bce_terms_mask_padding_and_the_other_task():
  loss, parts = _loss(inbatch_weight=0.0)
  assert parts["loss_rating"] == pytest.approx(MSE, rel=1e-6)
  assert parts["loss_bce"] == pytest.approx(BCE, rel=1e-6)
  assert loss == pytest.approx(10 * MSE + BCE, rel=1e-6)
  assert "loss_inbatch" not in parts


def test_inbatch_softmax_candidates_and_logq_by_hand():
  loss, parts = _loss()
  assert parts["loss_inbatch"] == pytest.approx(np.mean(SOFTMAX), rel=1e-6)
  assert loss == pytest.approx(10 * MSE + BCE + np.mean(SOFTMAX), rel=1e-6)
  _, parts = _loss(logq=False)
  assert parts["loss_inbatch"] == pytest.approx(np.mean(SOFTMAX_NO_LOGQ), rel=1e-6)


def test_domain_weights_weigh_rows_of_that_domain():
  _, parts = _loss(domain_weight=(1.0, 2.0))
  # Within one domain's term the weight cancels; across domains (in-batch) it counts twice.
  assert parts["loss_rating"] == pytest.approx(MSE, rel=1e-6)
  assert parts["loss_bce"] == pytest.approx(BCE, rel=1e-6)
  assert parts["loss_inbatch"] == pytest.approx(
      (SOFTMAX[0] + SOFTMAX[1] + 2 * SOFTMAX[2]) / 4, rel=1e-6)
