"""The Optax chain from config: AdamW with a decay mask, warmup + linear/cosine decay, global-norm
clipping, gradient accumulation and frozen / parameter-efficient training."""

from __future__ import annotations

import re

import optax
from flax import traverse_util


def learning_rate_schedule(config) -> optax.Schedule:
  o = config.optim
  warmup = int(o.warmup_steps)
  decay_steps = max(int(config.train_steps) - warmup, 1)
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, warmup + decay_steps,
                                              end_value=o.learning_rate * o.end_lr_factor)
  if o.schedule == "linear":
    return optax.join_schedules([
        optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
        optax.linear_schedule(o.learning_rate, o.learning_rate * o.end_lr_factor, decay_steps)],
        [warmup])
  if o.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, max(warmup, 1)),
                                 optax.constant_schedule(o.learning_rate)], [warmup])
  raise ValueError(f"optim.schedule must be cosine, linear or constant, got {o.schedule!r}")


def _path(keys) -> str:
  return "/".join(str(k) for k in keys)


def decay_mask(params, config):
  """True where weight decay applies: kernels, not biases / LayerNorm / embeddings (configurable)."""
  no_decay = [re.compile(p) for p in config.optim.no_decay_patterns]
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: not any(p.search(_path(k)) for p in no_decay) for k in flat})


def trainable_labels(params, config):
  """'encoder', 'head' (everything else) or 'frozen' per parameter.

  ``optim.freeze_encoder_layers = k`` freezes the word/position embeddings and encoder layers
  below ``k`` (k = -1 freezes the whole encoder); ``optim.trainable_patterns`` (regexes), when
  set, trains only matching parameters: the parameter-efficient mode.
  """
  k = int(config.optim.freeze_encoder_layers)
  patterns = [re.compile(p) for p in config.optim.trainable_patterns]
  labels = {}
  for key in traverse_util.flatten_dict(params):
    path = _path(key)
    frozen = False
    if key[0] == "encoder" and k != 0:
      if k < 0 or key[1] == "embeddings":
        frozen = True
      elif key[1] == "layers":
        frozen = int(key[2]) < k
    if patterns:
      frozen = not any(p.search(path) for p in patterns)
    labels[key] = "frozen" if frozen else "encoder" if key[0] == "encoder" else "head"
  return traverse_util.unflatten_dict(labels)


def create_optimizer(config, params) -> optax.GradientTransformation:  # pylint: disable=unused-argument
  """clip -> {encoder: AdamW(lr * encoder_lr_factor), head: AdamW(lr), frozen: zero}."""
  o = config.optim
  schedule = learning_rate_schedule(config)
  # A callable mask: inside multi_transform each AdamW sees its own masked subtree.
  mask = lambda p: decay_mask(p, config)

  def adamw(factor):
    lr = schedule if factor == 1.0 else (lambda step: factor * schedule(step))
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)

  tx = optax.multi_transform({"encoder": adamw(float(o.encoder_lr_factor)), "head": adamw(1.0),
                              "frozen": optax.set_to_zero()}, trainable_labels(params, config))
  if o.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  if o.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.accumulate_steps))
  return tx
