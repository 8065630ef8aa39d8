"""Multi-task head: one tower per domain, optional shared experts with per-domain gates (MMoE).

Per-domain weights are stacked along a leading ``domain`` axis and evaluated for all domains
with one einsum, then the example's own domain is selected: with a handful of domains this
is cheaper than a gather of weight matrices and keeps shapes static for jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DOMAIN, EXPERT, FEATURE, HIDDEN = "domain", "expert", "embed", "mlp"


# LeCun-normal on stacked [n, in, out] weights, with fan_in = in (not n * in).
_stacked_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                  in_axis=-2, out_axis=-1, batch_axis=(0,))


def _param(rngs, shape, axes):
  return nnx.Param(_stacked_init(rngs.params(), shape, jnp.float32), logical_axes=axes)


def rating_bias_for_mean(mean: float, low: float, high: float) -> float:
  """Output bias at which the rating head predicts ``mean`` (inverse of its scaled sigmoid).

  Starting from the training mean rather than the scale's midpoint spares the first steps
  the job of learning the global offset (about 0.5 stars on 1-5 data).
  """
  p = min(max((mean - low) / (high - low), 1e-3), 1.0 - 1e-3)
  return float(np.log(p / (1.0 - p)))


def _zeros(shape, axes):
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class MultiTaskHead(nnx.Module):
  """Scores (user, item, domain) triples.

  Outputs per example, for its domain: ``rating`` (explicit rating on the domain's scale),
  ``logit`` (implicit interaction logit) and ``retrieval`` (dot product of per-domain user and
  item projections; the only output that factorises, hence the one used for top-K).
  """

  def __init__(self, dim: int, num_domains: int, *, tower_dim: int = 128, retrieval_dim: int = 64,
               num_experts: int = 0, rating_ranges=None, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_domains, self.num_experts, self.dtype = num_domains, num_experts, dtype
    features = 3 * dim  # [u, v, u * v]
    if num_experts:
      self.expert_kernel = _param(rngs, (num_experts, features, tower_dim), (EXPERT, FEATURE, HIDDEN))
      self.expert_bias = _zeros((num_experts, tower_dim), (EXPERT, HIDDEN))
      self.gate_kernel = _param(rngs, (num_domains, features, num_experts), (DOMAIN, FEATURE, EXPERT))
      self.gate_bias = _zeros((num_domains, num_experts), (DOMAIN, EXPERT))
      self.tower_kernel = _param(rngs, (num_domains, tower_dim, tower_dim), (DOMAIN, HIDDEN, HIDDEN))
    else:
      self.tower_kernel = _param(rngs, (num_domains, features, tower_dim), (DOMAIN, FEATURE, HIDDEN))
    self.tower_bias = _zeros((num_domains, tower_dim), (DOMAIN, HIDDEN))
    # Two outputs per domain: raw rating and interaction logit.
    self.out_kernel = _param(rngs, (num_domains, tower_dim, 2), (DOMAIN, HIDDEN, None))
    self.out_bias = _zeros((num_domains, 2), (DOMAIN, None))
    self.user_retrieval = _param(rngs, (num_domains, dim, retrieval_dim), (DOMAIN, FEATURE, None))
    self.item_retrieval = _param(rngs, (num_domains, dim, retrieval_dim), (DOMAIN, FEATURE, None))
    # Static per-domain rating scales (graph attributes, not state).
    ranges = tuple(rating_ranges or [(0.0, 1.0)] * num_domains)
    self.rating_low = tuple(float(r[0]) for r in ranges)
    self.rating_high = tuple(float(r[1]) for r in ranges)

  def towers(self, user, item):
    """Hidden tower activations for every domain: [B, D, tower_dim]."""
    x = jnp.concatenate([user, item, user * item], axis=-1).astype(self.dtype)
    if self.num_experts:
      experts = jax.nn.gelu(jnp.einsum("bf,efh->beh", x, self.expert_kernel[...].astype(self.dtype))
                            + self.expert_bias[...])
      gates = jax.nn.softmax(jnp.einsum("bf,dfe->bde", x, self.gate_kernel[...].astype(self.dtype))
                             + self.gate_bias[...], axis=-1)
      mixed = jnp.einsum("bde,beh->bdh", gates, experts)
      h = jnp.einsum("bdh,dhk->bdk", mixed, self.tower_kernel[...].astype(self.dtype))
    else:
      h = jnp.einsum("bf,dfh->bdh", x, self.tower_kernel[...].astype(self.dtype))
    return jax.nn.gelu(h + self.tower_bias[...])

  def project_users(self, user):
    """Per-domain retrieval projections [B, D, R] (items: ``project_items``)."""
    return jnp.einsum("bf,dfr->bdr", user, self.user_retrieval[...].astype(user.dtype))

  def project_items(self, item):
    return jnp.einsum("bf,dfr->bdr", item, self.item_retrieval[...].astype(item.dtype))

  def __call__(self, user, item, domain):
    h = self.towers(user, item)
    out = jnp.einsum("bdh,dho->bdo", h, self.out_kernel[...].astype(h.dtype)) + self.out_bias[...]
    out = jnp.take_along_axis(out, domain[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    low = jnp.asarray(self.rating_low)[domain]
    high = jnp.asarray(self.rating_high)[domain]
    rating = low + (high - low) * jax.nn.sigmoid(out[:, 0])
    u = jnp.take_along_axis(self.project_users(user), domain[:, None, None], axis=1)[:, 0]
    v = jnp.take_along_axis(self.project_items(item), domain[:, None, None], axis=1)[:, 0]
    retrieval = jnp.sum(u * v, axis=-1).astype(jnp.float32)
    return {"rating": rating, "logit": out[:, 1], "retrieval": retrieval}
