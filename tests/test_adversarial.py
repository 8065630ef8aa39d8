"""Adversarial regularizers: bounded perturbations, exact no-op at eps = 0, a real effect when on."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from crossrec_jax.training import adversarial


def _loss_of_embeds():
  w = 0.1 * jax.random.normal(jax.random.key(1), (8,))  # small: no tanh saturation

  def loss(e):
    logits = jnp.einsum("bth,h->b", jnp.tanh(e["user"]), w) + jnp.einsum("bth,h->b", e["item"], w)
    rating = 3 + jnp.tanh(logits)
    return jnp.mean(jnp.square(rating - 4.0)), {"logit": logits, "rating": rating}
  return loss


def _embeds():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"user": jax.random.normal(k1, (4, 5, 8)), "item": jax.random.normal(k2, (4, 3, 8))}


def _cfg(method, eps=0.3, weight=0.5, steps=3):
  return ml_collections.ConfigDict(dict(method=method, eps=eps, weight=weight, step_size=0.2,
                                        steps=steps, noise=1e-2))


def _div(adv, clean):
  return adversarial.divergence(adv, clean, jnp.ones(4), jnp.array([True, False, True, False]),
                                jnp.ones(4))


@pytest.mark.parametrize("eps", [0.05, 0.3, 2.0])
def test_perturbation_norms_never_exceed_eps(eps):
  loss, embeds = _loss_of_embeds(), _embeds()
  rs = [adversarial.fgm_perturbation(loss, embeds, eps),
        adversarial.pgd_perturbation(loss, embeds, eps, 0.7, 5, jax.random.key(3)),
        adversarial.smart_perturbation(lambda e: _div(loss(e)[1], loss(embeds)[1]), embeds, eps,
                                       0.7, 3, jax.random.key(4), 1e-2)]
  for r in rs:
    for x in jax.tree.leaves(r):
      norms = np.sqrt(np.sum(np.square(np.asarray(x)), axis=(1, 2)))
      assert np.all(norms <= eps * (1 + 1e-5)), norms
  # FGM sits on the sphere of radius eps (the gradient is non-zero here).
  fgm = np.sqrt(np.sum(np.square(np.asarray(rs[0]["user"])), axis=(1, 2)))
  np.testing.assert_allclose(fgm, eps, rtol=1e-5)


@pytest.mark.parametrize("method", ["fgm", "pgd", "smart"])
def test_eps_zero_equals_plain_loss_and_gradients_exactly(method):
  loss, embeds = _loss_of_embeds(), _embeds()
  plain = jax.value_and_grad(lambda e: adversarial.regularized_loss(loss, e, _cfg("none"), jax.random.key(0))[0])
  reg = jax.value_and_grad(lambda e: adversarial.regularized_loss(
      loss, e, _cfg(method, eps=0.0), jax.random.key(0), divergence_fn=_div)[0])
  (v0, g0), (v1, g1) = plain(embeds), reg(embeds)
  assert float(v0) == float(v1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", ["fgm", "pgd", "smart"])
def test_regularizer_changes_loss_and_gradients_when_on(method):
  loss, embeds = _loss_of_embeds(), _embeds()
  plain = jax.value_and_grad(lambda e: adversarial.regularized_loss(loss, e, _cfg("none"), jax.random.key(0))[0])
  reg = jax.value_and_grad(lambda e: adversarial.regularized_loss(
      loss, e, _cfg(method), jax.random.key(0), divergence_fn=_div)[0])
  (v0, g0), (v1, g1) = plain(embeds), reg(embeds)
  assert float(v1) > float(v0)  # adversarial loss / smoothness term only adds
  assert not np.allclose(np.asarray(g0["user"]), np.asarray(g1["user"]))


def test_small_eps_is_continuous_with_plain_loss():
  loss, embeds = _loss_of_embeds(), _embeds()
  v0 = adversarial.regularized_loss(loss, embeds, _cfg("none"), jax.random.key(0))[0]
  v1 = adversarial.regularized_loss(loss, embeds, _cfg("fgm", eps=1e-6), jax.random.key(0))[0]
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="adversarial.method must be one of"):
    adversarial.regularized_loss(_loss_of_embeds(), _embeds(), _cfg("vat"), jax.random.key(0))


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_bf16_embeddings_get_the_exact_float32_perturbation(method):
  """With bf16 embeddings of a BERT-like shape and scale, the perturbation is computed and added
  in float32: the applied change is the intended one, where adding it in bf16 would round most
  coordinates away (per coordinate it is ~eps / sqrt(T * H), far below a bf16 ulp)."""
  w = 0.1 * jax.random.normal(jax.random.key(1), (256,))

  def loss(e):
    logits = jnp.einsum("bth,h->b", jnp.tanh(e["user"].astype(jnp.float32)), w)
    return jnp.mean(jnp.square(logits - 1.0)), {"logit": logits, "rating": logits}

  embeds = {"user": (0.05 * jax.random.normal(jax.random.key(0), (2, 64, 256))).astype(jnp.bfloat16)}
  eps = 0.02
  r = (adversarial.fgm_perturbation(loss, embeds, eps) if method == "fgm" else
       adversarial.pgd_perturbation(loss, embeds, eps, 0.01, 2, jax.random.key(3)))
  e, d, a = embeds["user"], r["user"], adversarial.perturb(embeds, r)["user"]
  assert d.dtype == jnp.float32 and a.dtype == jnp.float32
  change = np.asarray(a) - np.asarray(e, np.float32)
  np.testing.assert_allclose(change, np.asarray(d), rtol=1e-3, atol=1e-8)  # f32 rounding of e + d
  assert np.mean(change == 0) < 0.01
  assert np.all(np.sqrt(np.sum(np.square(np.asarray(d)), axis=(1, 2))) <= eps * (1 + 1e-4))
  in_bf16 = np.asarray((e + d.astype(jnp.bfloat16)).astype(jnp.float32) - e.astype(jnp.float32))
  assert np.mean(in_bf16 == 0) > 0.3  # what adding in bf16 loses (the bug this guards against)
