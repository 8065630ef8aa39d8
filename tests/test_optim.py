"""The optimizer chain by hand: warmup + linear / cosine / constant schedules, global-norm
clipping before Adam, and the encoder learning-rate factor (no model: plain parameter trees)."""

import math

import numpy as np
import optax
import pytest

from crossrec_jax import config_defaults
from crossrec_jax.training import optim


def _config(**optim_fields):
  config = config_defaults.base_config()
  config.train_steps = 10
  config.optim.update(dict(learning_rate=1.0, warmup_steps=4, end_lr_factor=0.1, weight_decay=0.0))
  config.optim.update(optim_fields)
  return config


@pytest.mark.parametrize("schedule,expected", [
    # warmup 0 -> 1 over 4 steps, then to 0.1 at step 10.
    ("linear", {0: 0.0, 2: 0.5, 4: 1.0, 7: 0.55, 10: 0.1}),
    ("cosine", {0: 0.0, 2: 0.5, 4: 1.0, 5: 0.1 + 0.45 * (1 + math.cos(math.pi / 6)), 10: 0.1}),
    ("constant", {0: 0.0, 2: 0.5, 4: 1.0, 10: 1.0}),
])
def test_learning_rate_schedules(schedule, expected):
  fn = optim.learning_rate_schedule(_config(schedule=schedule))
  assert {s: float(fn(s)) for s in expected} == pytest.approx(expected, abs=1e-6)


def _updates(config, params, grads_per_step):
  tx = optim.create_optimizer(config, params)
  state, out = tx.init(params), []
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def test_encoder_learning_rate_factor():
  params = {"encoder": {"w": np.zeros(2, np.float32)}, "head": {"w": np.zeros(2, np.float32)}}
  grads = {"encoder": {"w": np.array([3.0, -2.0], np.float32)},
           "head": {"w": np.array([3.0, -2.0], np.float32)}}
  (updates,) = _updates(_config(warmup_steps=0, encoder_lr_factor=0.1, clip_norm=0.0), params, [grads])
  # First Adam step: -lr * g / |g| (eps aside); the encoder's lr is 0.1 of the head's.
  # Tolerance: float32 bias corrections (1 - 0.999) round at ~1e-5.
  np.testing.assert_allclose(updates["head"]["w"], [-1.0, 1.0], rtol=1e-4)
  np.testing.assert_allclose(updates["encoder"]["w"], [-0.1, 0.1], rtol=1e-4)


@pytest.mark.parametrize("clip_norm", [0.0, 1.0])
def test_global_norm_clipping_comes_before_adam(clip_norm):
  # b1 = 0, b2 = 0.5: step 2's Adam denominator remembers step 1's gradient size.
  config = _config(warmup_steps=0, schedule="constant", b1=0.0, b2=0.5, eps=0.0, clip_norm=clip_norm)
  params = {"head": {"w": np.zeros(1, np.float32)}}
  first, second = _updates(config, params, [{"head": {"w": np.array([100.0], np.float32)}},
                                            {"head": {"w": np.array([1.0], np.float32)}}])
  np.testing.assert_allclose(first["head"]["w"], [-1.0], rtol=1e-6)
  # v2 = 0.25 g1^2 + 0.5 g2^2, bias-corrected by 1 - 0.25. Clipped, g1 is 1 instead of 100.
  g1 = min(100.0, clip_norm) if clip_norm else 100.0
  expected = -1.0 / math.sqrt((0.25 * g1 ** 2 + 0.5) / 0.75)
  np.testing.assert_allclose(second["head"]["w"], [expected], rtol=1e-5)
