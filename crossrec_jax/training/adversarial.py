"""Adversarial perturbation regularizers on word embeddings (pure functions, jit-safe).

``loss_of_embeds(embeds) -> (loss, predictions)`` is the model's loss as a function of the
word embeddings (a dict of [B, T, H] arrays). Perturbations are normalised per example over
(T, H) and never exceed ``eps`` in L2 norm. They are computed in float32 and added to a
float32 copy of the embeddings, whatever the model's compute dtype: with bf16 embeddings a
perturbation of ~1e-4 per coordinate would mostly round away (and bend its direction). The
perturbed float32 embeddings go into the model, which casts after its embedding LayerNorm.

- ``fgm``: one step r = eps * g / ||g||; objective (1 - w) * L(x) + w * L(x + r)
  (Goodfellow et al.'s mixture, so w interpolates between clean and adversarial training).
- ``pgd``: K projected ascent steps of size ``step_size`` inside the eps-ball; same objective.
- ``smart``: a virtual-adversarial smoothness term L(x) + w * D(f(x + r), f(x)) with r found by
  K ascent steps on D from a small random start (Jiang et al., SMART); D is the symmetric
  Bernoulli KL on interaction logits plus the squared difference of normalised ratings.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

METHODS = ("none", "fgm", "pgd", "smart")


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
  """Returns (total loss, (clean predictions, metrics)).

  With ``method='none'``, ``eps == 0`` or ``weight == 0`` no extra term is traced at all,
  so the loss and gradients are exactly those of the plain step.
  """
  method, eps, w = adv_config.method, float(adv_config.eps), float(adv_config.weight)
  if method not in METHODS:
    raise ValueError(f"adversarial.method must be one of {METHODS}, got {method!r}")
  clean, predictions = loss_of_embeds(embeds)
  metrics = {"loss_clean": clean}
  if method == "none" or eps == 0.0 or w == 0.0:
    return clean, (predictions, metrics)
  if method in ("fgm", "pgd"):
    if method == "fgm":
      r = fgm_perturbation(loss_of_embeds, embeds, eps)
    else:
      r = pgd_perturbation(loss_of_embeds, embeds, eps, adv_config.step_size, adv_config.steps, rng)
    adv, _ = loss_of_embeds(perturb(embeds, r))
    metrics["loss_adversarial"] = adv
    total = (1.0 - w) * clean + w * adv
  else:
    target = jax.lax.stop_gradient(predictions)
    div = lambda e: divergence_fn(loss_of_embeds(e)[1], target)
    r = smart_perturbation(div, embeds, eps, adv_config.step_size, adv_config.steps, rng,
                           adv_config.noise)
    smooth = divergence_fn(loss_of_embeds(perturb(embeds, r))[1], predictions)
    metrics["smoothness"] = smooth
    total = clean + w * smooth
  metrics["perturbation_norm"] = jnp.max(jnp.stack(
      [jnp.max(_per_example_norm(x)) for x in jax.tree.leaves(r)]))
  return total, (predictions, metrics)
