"""The one optax factory of every encoder mode: ``make_optimizer(OptimizerSettings, labels)``.

One warmup rule: the learning rate rises linearly from 0 to the group's peak over W steps, W =
``warmup_steps``, or, with ``warmup_fraction`` > 0, that fraction of the total steps (at least
one), then decays (cosine, linear or constant) to ``end_lr_factor`` x peak at the last step.
Parameter groups (e.g. the encoder and the rest) each have their own peak learning rate and
weight decay; a group with weight decay is AdamW (on the parameters ``decay_mask`` allows), one
without is Adam; parameters labelled ``FROZEN`` get no update. Then optional global-norm
clipping (before Adam) and gradient accumulation.

The modes: ``end_to_end`` builds its settings from ``config.optim`` (``create_optimizer``);
``tune`` from ``config.tune`` (training/tune.py); ``frozen`` from ``HybridSettings``: plain
Adam, warmup a fraction of the total steps, cosine to 0.1 x lr, no decay, no clipping:

    make_optimizer(OptimizerSettings({"all": Group(s.learning_rate)}, total_steps,
                                     warmup_fraction=s.warmup_fraction))
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import optax
from flax import traverse_util

FROZEN = "frozen"  # the label of parameters that never move
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class Group:
  learning_rate: float       # the peak, reached at the end of the warmup
  weight_decay: float = 0.0  # decoupled (AdamW); 0: plain Adam


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  groups: Mapping[str, Group]  # label -> group (``FROZEN`` is reserved)
  total_steps: int
  warmup_steps: int = 0
  warmup_fraction: float = 0.0  # > 0: the warmup is this fraction of total_steps instead
  schedule: str = "cosine"
  end_lr_factor: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 0.0        # 0: no clipping
  accumulate_steps: int = 1


def warmup_steps(settings: OptimizerSettings) -> int:
  """W of the warmup rule (module docstring)."""
  if settings.warmup_fraction and settings.warmup_steps:
    raise ValueError(f"set warmup_steps ({settings.warmup_steps}) or warmup_fraction "
                     f"({settings.warmup_fraction}), not both")
  if settings.warmup_fraction:
    return max(1, int(settings.warmup_fraction * settings.total_steps))
  return int(settings.warmup_steps)


def learning_rate(settings: OptimizerSettings, peak: float) -> optax.Schedule:
  """The schedule of a group with peak learning rate ``peak``."""
  warm = warmup_steps(settings)
  decay = max(int(settings.total_steps) - warm, 1)
  end = peak * settings.end_lr_factor
  if settings.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, warm + decay, end_value=end)
  rise = optax.linear_schedule(0.0, peak, max(warm, 1))
  if settings.schedule == "linear":
    return optax.join_schedules([rise, optax.linear_schedule(peak, end, decay)], [warm])
  if settings.schedule == "constant":
    return optax.join_schedules([rise, optax.constant_schedule(peak)], [warm])
  raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got "
                   f"{settings.schedule!r}")


def make_optimizer(settings: OptimizerSettings, labels: Any = None,
                   decay_mask: Any = None) -> optax.GradientTransformation:
  """The optimizer of ``settings``. ``labels``: a pytree (or a function of the params giving
  one) of group names per parameter; None with a single group: that group's optimizer alone
  (no ``multi_transform`` around it). ``decay_mask``: where weight decay applies (a pytree or
  a function of the params; None: everywhere)."""
  s = settings
  if FROZEN in s.groups:
    raise ValueError(f"the group name {FROZEN!r} is reserved for parameters that never move")

  def group_tx(group: Group):
    lr = learning_rate(s, group.learning_rate)
    if group.weight_decay:
      return optax.adamw(lr, b1=s.b1, b2=s.b2, eps=s.eps, weight_decay=group.weight_decay,
                         mask=decay_mask)
    return optax.adam(lr, b1=s.b1, b2=s.b2, eps=s.eps)

  if labels is None:
    if len(s.groups) != 1:
      raise ValueError(f"{len(s.groups)} parameter groups {sorted(s.groups)} need labels")
    tx = group_tx(next(iter(s.groups.values())))
  else:
    tx = optax.multi_transform({name: group_tx(g) for name, g in s.groups.items()}
                               | {FROZEN: optax.set_to_zero()}, labels)
  if s.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(s.clip_norm), tx)
  if s.accumulate_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(s.accumulate_steps))
  return tx


# ------------------------------------------------------------------------------------------------
# encoder_mode "end_to_end": the settings from config.optim.

def settings_from_config(config) -> OptimizerSettings:
  """``config.optim`` over ``config.train_steps``: groups "encoder" (learning rate x
  ``encoder_lr_factor``) and "head" (the rest), both with ``weight_decay``."""
  o = config.optim
  lr, wd = float(o.learning_rate), float(o.weight_decay)
  return OptimizerSettings(
      {"encoder": Group(lr * float(o.encoder_lr_factor), wd), "head": Group(lr, wd)},
      int(config.train_steps), warmup_steps=int(o.warmup_steps), schedule=o.schedule,
      end_lr_factor=float(o.end_lr_factor), b1=o.b1, b2=o.b2, eps=o.eps,
      clip_norm=float(o.clip_norm), accumulate_steps=int(o.accumulate_steps))


def learning_rate_schedule(config) -> optax.Schedule:
  """The end-to-end head group's learning rate by step (what the train loop logs)."""
  return learning_rate(settings_from_config(config), float(config.optim.learning_rate))


def _path(keys) -> str:
  return "/".join(str(k) for k in keys)


def decay_mask(params, config):
  """True where weight decay applies: kernels, not biases / LayerNorm / embeddings (configurable)."""
  no_decay = [re.compile(p) for p in config.optim.no_decay_patterns]
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: not any(p.search(_path(k)) for p in no_decay) for k in flat})


def trainable_labels(params, config):
  """'encoder', 'head' (everything else) or ``FROZEN`` per parameter.

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
    labels[key] = FROZEN if frozen else "encoder" if key[0] == "encoder" else "head"
  return traverse_util.unflatten_dict(labels)


def create_optimizer(config, params) -> optax.GradientTransformation:
  """The end-to-end optimizer: clip -> {encoder, head: AdamW with the decay mask, frozen: zero}."""
  return make_optimizer(settings_from_config(config), trainable_labels(params, config),
                        decay_mask=lambda p: decay_mask(p, config))
