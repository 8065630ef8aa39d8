"""Adversarial regularizers, one objective for every method and encoder mode (pure, jit-safe):

    L + w * L_adv

L is the plain training loss (with its penalties), w = ``adversarial.weight`` and L_adv the data
loss at a worst-case perturbation r of the inputs, ``||r|| <= eps`` (``adversarial.eps``). Where
the perturbation lives is the method:

- on the word embeddings (encoder modes ``tune`` and ``end_to_end``; ``regularized_loss``):
  ``fgm``: one step r = eps * g / ||g|| (Goodfellow et al.); ``pgd``: K projected ascent steps of
  size ``step_size`` inside the eps-ball from a random start (Madry et al.); ``smart``: L_adv is
  the smoothness divergence D(f(x + r), f(x)) instead of the loss, r found by K ascent steps on
  D from a small random start (Jiang et al., SMART); D is the symmetric Bernoulli KL on
  interaction logits plus the squared difference of normalised ratings. Perturbations are
  normalised per example over (T, H), computed in float32 and added to a float32 copy of the
  embeddings, whatever the model's compute dtype: with bf16 embeddings a perturbation of ~1e-4
  per coordinate would mostly round away (and bend its direction).
- on the user and item vectors (encoder mode ``frozen``; ``apr_gradients``): ``apr``, one
  normalised gradient step per vector (He et al., 2018, APR).

``METHODS_BY_MODE`` says which method each encoder mode supports; ``config_check`` refuses the
rest. w = 0 or eps = 0 (or method "none") gives exactly the plain loss and gradients.
"""

from __future__ import annotations

from typing import Callable

import dataclasses

import jax
import jax.numpy as jnp

WORD_METHODS = ("fgm", "pgd", "smart")  # perturb the encoder's word embeddings
METHODS = ("none", *WORD_METHODS, "apr")
# tune: smart needs the hybrid model's per-example predictions, which its loss does not return.
METHODS_BY_MODE = {"frozen": ("none", "apr"), "tune": ("none", "fgm", "pgd"),
                   "end_to_end": ("none", *WORD_METHODS)}
# eps / weight where the config leaves them None. Word embeddings have norm ~1 (BERT / MiniLM):
# eps 0.02 (a larger one halved the demo's NDCG); weight 0.25 is the measured 0.8 L + 0.2 L_adv
# mixture up to its scale. APR: the measured bench setting (per user / item vector).
DEFAULTS = {"fgm": (0.02, 0.25), "pgd": (0.02, 0.25), "smart": (0.02, 0.25), "apr": (0.05, 0.5),
            "none": (0.0, 0.0)}


@dataclasses.dataclass(frozen=True)
class Adversarial:
  """``config.adversarial`` with the method's defaults filled in (see ``resolve``)."""
  method: str = "none"
  eps: float = 0.0
  weight: float = 0.0
  step_size: float = 0.01
  steps: int = 2
  noise: float = 1e-3

  @property
  def active(self) -> bool:
    return self.method != "none" and self.eps != 0.0 and self.weight != 0.0


def resolve(adv_config) -> Adversarial:
  """``config.adversarial`` (or an ``Adversarial``) with eps / weight None taken from
  ``DEFAULTS``; an unknown method is a ValueError naming the setting."""
  if isinstance(adv_config, Adversarial):
    return adv_config
  method = adv_config.method
  if method not in METHODS:
    raise ValueError(f"adversarial.method must be one of {METHODS}, got {method!r}")
  eps, weight = DEFAULTS[method]
  return Adversarial(method, float(eps if adv_config.eps is None else adv_config.eps),
                     float(weight if adv_config.weight is None else adv_config.weight),
                     float(adv_config.step_size), int(adv_config.steps), float(adv_config.noise))


def _per_example_norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)),
                          keepdims=True))


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def normalize(g, eps):
  """eps * g / ||g|| per example (zero where g is zero), in float32."""
  g = g.astype(jnp.float32)
  return eps * g / jnp.maximum(_per_example_norm(g), 1e-12)


def project(r, eps):
  """Projects each example of r onto the L2 ball of radius eps, in float32."""
  r = r.astype(jnp.float32)
  return r * jnp.minimum(1.0, eps / jnp.maximum(_per_example_norm(r), 1e-12))


def perturb(embeds, r):
  """embeds + r in float32 (the model casts to its compute dtype after the embedding sum)."""
  return jax.tree.map(lambda e, d: e.astype(jnp.float32) + d.astype(jnp.float32), embeds, r)


def fgm_perturbation(loss_of_embeds, embeds, eps):
  g = jax.grad(lambda e: loss_of_embeds(e)[0])(_f32(jax.lax.stop_gradient(embeds)))
  return jax.tree.map(lambda x: jax.lax.stop_gradient(normalize(x, eps)), g)


def pgd_perturbation(loss_of_embeds, embeds, eps, step_size, steps, rng):
  base = _f32(jax.lax.stop_gradient(embeds))
  keys = jax.random.split(rng, len(jax.tree.leaves(base)))
  leaves, treedef = jax.tree.flatten(base)
  # Random start inside the ball (as in Madry et al.), then projected normalised ascent.
  r = jax.tree.unflatten(treedef, [project(normalize(jax.random.normal(k, x.shape, x.dtype), eps)
                                           * jax.random.uniform(k, (x.shape[0],) + (1,) * (x.ndim - 1)), eps)
                                   for k, x in zip(keys, leaves)])
  grad_fn = jax.grad(lambda d: loss_of_embeds(perturb(base, d))[0])
  for _ in range(steps):  # K is small and static: unrolled
    g = grad_fn(r)
    r = jax.tree.map(lambda d, gi: project(d + normalize(gi, step_size), eps), r, g)
  return jax.tree.map(jax.lax.stop_gradient, r)


def divergence(adv, clean, rating_scale, task_is_rating, weight):
  """Symmetric KL on logits (implicit rows) + squared normalised rating gap (rating rows)."""
  p, q = jax.nn.sigmoid(adv["logit"]), jax.nn.sigmoid(clean["logit"])
  lp, lq = jax.nn.log_sigmoid(adv["logit"]), jax.nn.log_sigmoid(clean["logit"])
  lp1, lq1 = jax.nn.log_sigmoid(-adv["logit"]), jax.nn.log_sigmoid(-clean["logit"])
  sym_kl = (p - q) * (lp - lq) + ((1 - p) - (1 - q)) * (lp1 - lq1)
  rating_gap = jnp.square((adv["rating"] - clean["rating"]) / rating_scale)
  per_example = jnp.where(task_is_rating, rating_gap, sym_kl)
  return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def smart_perturbation(divergence_of_embeds, embeds, eps, step_size, steps, rng, noise):
  base = _f32(jax.lax.stop_gradient(embeds))
  leaves, treedef = jax.tree.flatten(base)
  keys = jax.random.split(rng, len(leaves))
  r = jax.tree.unflatten(treedef, [project(noise * jax.random.normal(k, x.shape, x.dtype), eps)
                                   for k, x in zip(keys, leaves)])
  grad_fn = jax.grad(lambda d: divergence_of_embeds(perturb(base, d)))
  for _ in range(steps):
    g = grad_fn(r)
    r = jax.tree.map(lambda d, gi: project(d + normalize(gi, step_size), eps), r, g)
  return jax.tree.map(jax.lax.stop_gradient, r)


def regularized_loss(loss_of_embeds: Callable, embeds, adv_config, rng, *,
                     divergence_fn: Callable | None = None):
  """L + w * L_adv on the word embeddings; returns (that total, (clean predictions, metrics)).

  ``loss_of_embeds(embeds) -> (loss, predictions)`` is the data loss as a function of the word
  embeddings (a pytree of [B, T, H] arrays); ``divergence_fn(adv_predictions, clean)`` is D
  (smart only). Inactive (method "none", eps 0 or weight 0): no extra term is traced at all, so
  the loss and gradients are exactly those of the plain step.
  """
  adv = resolve(adv_config)
  if adv.method not in ("none", *WORD_METHODS):
    raise ValueError(f"adversarial.method={adv.method!r} perturbs user / item vectors "
                     f"(encoder_mode frozen), not word embeddings; here use one of {WORD_METHODS}")
  clean, predictions = loss_of_embeds(embeds)
  metrics = {"loss_clean": clean}
  if not adv.active:
    return clean, (predictions, metrics)
  eps = adv.eps
  if adv.method in ("fgm", "pgd"):
    if adv.method == "fgm":
      r = fgm_perturbation(loss_of_embeds, embeds, eps)
    else:
      r = pgd_perturbation(loss_of_embeds, embeds, eps, adv.step_size, adv.steps, rng)
    term, _ = loss_of_embeds(perturb(embeds, r))
    metrics["loss_adversarial"] = term
  else:
    if divergence_fn is None:
      raise ValueError("adversarial.method='smart' needs divergence_fn (D on the predictions)")
    target = jax.lax.stop_gradient(predictions)
    div = lambda e: divergence_fn(loss_of_embeds(e)[1], target)
    r = smart_perturbation(div, embeds, eps, adv.step_size, adv.steps, rng, adv.noise)
    term = divergence_fn(loss_of_embeds(perturb(embeds, r))[1], predictions)
    metrics["smoothness"] = term
  metrics["perturbation_norm"] = jnp.max(jnp.stack(
      [jnp.max(_per_example_norm(x)) for x in jax.tree.leaves(r)]))
  return clean + adv.weight * term, (predictions, metrics)


# ------------------------------------------------------------------------------------------------
# APR: the user and item vectors of a model on frozen text vectors.

def apr_perturbation(loss_fn: Callable, params, batch, num_user_vectors: int,
                     num_item_vectors: int, dim: int, eps: float):
  """(user_delta [U, dim], item_delta [I, dim]): eps * g / ||g|| per vector, g the gradient of
  ``loss_fn(params, batch, user_delta, item_delta)`` at zero deltas; gradient-stopped."""
  zeros_u = jnp.zeros((num_user_vectors, dim))
  zeros_i = jnp.zeros((num_item_vectors, dim))
  gu, gi = jax.grad(lambda du, di: loss_fn(params, batch, du, di), argnums=(0, 1))(zeros_u, zeros_i)
  scale = lambda g: eps * g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
  return jax.lax.stop_gradient(scale(gu)), jax.lax.stop_gradient(scale(gi))


def apr_gradients(loss_fn: Callable, params, batch, num_user_vectors: int, num_item_vectors: int,
                  dim: int, eps: float):
  """(L_adv, dL_adv/dparams) at the APR perturbation (``apr_perturbation``): the frozen mode's
  step adds ``weight`` times these gradients to the plain ones (``add_weighted``), which is the
  gradient of L + w * L_adv. ``loss_fn(params, batch, user_delta, item_delta) -> data loss``
  (a scalar, without the L2 penalties: they do not depend on the perturbation)."""
  du, di = apr_perturbation(loss_fn, params, batch, num_user_vectors, num_item_vectors, dim, eps)
  return jax.value_and_grad(lambda p: loss_fn(p, batch, du, di))(params)


def add_weighted(grads, adv_grads, weight: float):
  """grads + weight * adv_grads, leaf by leaf: the gradient of L + w * L_adv."""
  return jax.tree.map(lambda g, a: g + weight * a, grads, adv_grads)
