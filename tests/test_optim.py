"""The one optax factory by hand: the warmup rule, linear / cosine / constant schedules, global-norm
clipping before Adam, parameter groups (the encoder learning-rate factor, weight decay), and the
frozen and tune modes' former optimizers reproduced exactly (no model: plain parameter trees)."""

import math

import jax
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


def _random_grads(params, n, seed=0):
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
          for _ in range(n)]


def _run(tx, params, grads_per_step):
  state, out = tx.init(params), []
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _frozen_settings(lr, total, fraction):
  """The frozen mode's optimizer through the factory (the call given to training/hybrid.py)."""
  return optim.OptimizerSettings({"all": optim.Group(lr)}, total, warmup_fraction=fraction)


@pytest.mark.parametrize("total,fraction", [(0, 0.05), (1, 0.05), (2, 0.05), (7, 0.05), (40, 0.05),
                                            (300, 0.05), (1200, 0.05), (60, 0.3), (13, 0.0)])
def test_the_frozen_modes_former_schedule_step_by_step(total, fraction):
  """Formerly in training/hybrid.py: warmup_cosine_decay_schedule(0, lr, max(1, int(fraction *
  total)), max(total, 2), end 0.1 * lr); fraction 0 is the factory's warmup_steps = 0."""
  lr = 0.02
  former = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, int(fraction * total)) if fraction else 0, max(total, 2), end_value=0.1 * lr)
  now = optim.learning_rate(_frozen_settings(lr, total, fraction), lr)
  for step in range(total + 3):
    assert float(now(step)) == float(former(step)), step


def test_the_frozen_modes_former_optimizer_bit_for_bit():
  """Plain Adam on the schedule above: no weight decay, no clipping, no parameter groups."""
  params = {"item_factors": np.ones((5, 3), np.float32), "bias": np.zeros(5, np.float32)}
  total, lr = 30, 0.005
  former = optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, int(0.05 * total)), max(total, 2), end_value=0.1 * lr))
  now = optim.make_optimizer(_frozen_settings(lr, total, 0.05))
  grads = _random_grads(params, total)
  for a, b in zip(_run(former, params, grads), _run(now, params, grads)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_the_tune_modes_former_optimizer_bit_for_bit():
  """Formerly in training/tune.py: warmup total // 20, cosine to 0.1 x each peak; AdamW (0.01)
  on the encoder, Adam on the hybrid network."""
  from crossrec_jax.training import tune  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  ft = types.SimpleNamespace(learning_rate=1e-3, encoder_learning_rate=2e-4)
  params = {"encoder": {"w": np.ones((3, 2), np.float32)}, "hybrid": {"v": np.ones(4, np.float32)}}
  total = 45

  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, total // 20), max(total, 2),
                                              end_value=0.1 * peak)
  former = optax.multi_transform(
      {"encoder": optax.adamw(schedule(ft.encoder_learning_rate), weight_decay=0.01),
       "hybrid": optax.adam(schedule(ft.learning_rate))},
      lambda p: {k: jax.tree.map(lambda _: k, v) for k, v in p.items()})
  grads = _random_grads(params, total)
  for a, b in zip(_run(former, params, grads), _run(tune._optimizer(ft, total), params, grads)):  # pylint: disable=protected-access
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_one_warmup_rule():
  s = lambda **kw: optim.OptimizerSettings({"all": optim.Group(1.0)}, **kw)
  assert optim.warmup_steps(s(total_steps=100, warmup_steps=7)) == 7
  assert optim.warmup_steps(s(total_steps=100, warmup_fraction=0.05)) == 5
  assert optim.warmup_steps(s(total_steps=10, warmup_fraction=0.05)) == 1  # at least one step
  with pytest.raises(ValueError, match="not both"):
    optim.warmup_steps(s(total_steps=100, warmup_steps=7, warmup_fraction=0.05))
  # The end-to-end settings follow it: warmup_steps from config.optim, over train_steps.
  assert optim.warmup_steps(optim.settings_from_config(_config())) == 4


def test_groups_get_their_own_rate_and_decay_and_frozen_never_moves():
  params = {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32), "c": np.ones(2, np.float32)}
  settings = optim.OptimizerSettings({"a": optim.Group(1.0, weight_decay=0.5), "b": optim.Group(0.1)},
                                     10, schedule="constant")
  tx = optim.make_optimizer(settings, {"a": "a", "b": "b", "c": optim.FROZEN},
                            decay_mask={"a": True, "b": True, "c": True})
  zero = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # A zero gradient: Adam moves nothing, AdamW's decoupled decay moves "a" by -lr * wd * p.
  np.testing.assert_allclose(updates["a"], -0.5, rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], 0.0)
  np.testing.assert_array_equal(updates["c"], 0.0)
  ones = jax.tree.map(np.ones_like, params)
  updates, _ = optim.make_optimizer(settings, {"a": "a", "b": "b", "c": optim.FROZEN}).update(
      ones, tx.init(params), params)
  np.testing.assert_allclose(updates["b"], -0.1, rtol=1e-4)  # Adam's first step: -lr * sign(g)
  np.testing.assert_array_equal(updates["c"], 0.0)


def test_factory_refuses_ambiguous_groups():
  two = optim.OptimizerSettings({"x": optim.Group(1.0), "y": optim.Group(1.0)}, 10)
  with pytest.raises(ValueError, match="need labels"):
    optim.make_optimizer(two)
  with pytest.raises(ValueError, match="reserved"):
    optim.make_optimizer(optim.OptimizerSettings({optim.FROZEN: optim.Group(1.0)}, 10))
