"""Adversarial regularizers: one objective L + w * L_adv for every method (fgm / pgd / smart on
word embeddings, apr on user / item vectors), bounded perturbations, exact no-op at eps = 0 or
w = 0, and the encoder modes' combinations refused in one line."""

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


def test_small_eps_is_continuous_with_the_unperturbed_objective():
  # L + w * L(x + r) -> (1 + w) * L as eps -> 0.
  loss, embeds = _loss_of_embeds(), _embeds()
  v0 = adversarial.regularized_loss(loss, embeds, _cfg("none"), jax.random.key(0))[0]
  v1 = adversarial.regularized_loss(loss, embeds, _cfg("fgm", eps=1e-6), jax.random.key(0))[0]
  np.testing.assert_allclose(float(v1), 1.5 * float(v0), rtol=1e-5)


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


# -- one objective: L + w * L_adv -----------------------------------------------------------------

def _perturbation(method, loss, embeds, cfg, rng):
  """The method's perturbation, computed on its own (as regularized_loss must compute it)."""
  if method == "fgm":
    return adversarial.fgm_perturbation(loss, embeds, cfg.eps)
  if method == "pgd":
    return adversarial.pgd_perturbation(loss, embeds, cfg.eps, cfg.step_size, cfg.steps, rng)
  clean = jax.lax.stop_gradient(loss(embeds)[1])
  return adversarial.smart_perturbation(lambda e: _div(loss(e)[1], clean), embeds, cfg.eps,
                                        cfg.step_size, cfg.steps, rng, cfg.noise)


@pytest.mark.parametrize("method", ["fgm", "pgd", "smart"])
def test_every_method_trains_loss_plus_w_times_its_adversarial_term(method):
  """Value and gradient are those of L(x) + w * L_adv(x) with the perturbation r held fixed:
  L_adv = L(x + r) for fgm / pgd, D(f(x + r), f(x)) for smart. No (1 - w) on the clean loss."""
  loss, embeds, rng, w = _loss_of_embeds(), _embeds(), jax.random.key(5), 0.7
  cfg = _cfg(method, weight=w)
  r = _perturbation(method, loss, embeds, cfg, rng)

  def by_hand(e):
    plain, clean = loss(e)
    adv, perturbed = loss(adversarial.perturb(e, r))
    return plain + w * (_div(perturbed, clean) if method == "smart" else adv)

  reg = lambda e: adversarial.regularized_loss(loss, e, cfg, rng, divergence_fn=_div)[0]
  (v0, g0), (v1, g1) = jax.value_and_grad(by_hand)(embeds), jax.value_and_grad(reg)(embeds)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  plain = float(loss(embeds)[0])
  assert float(v1) > plain  # the term is really there


@pytest.mark.parametrize("method", ["fgm", "pgd", "smart"])
def test_weight_zero_is_the_plain_loss_and_gradients_exactly(method):
  loss, embeds = _loss_of_embeds(), _embeds()
  plain = jax.value_and_grad(lambda e: loss(e)[0])
  reg = jax.value_and_grad(lambda e: adversarial.regularized_loss(
      loss, e, _cfg(method, weight=0.0), jax.random.key(0), divergence_fn=_div)[0])
  (v0, g0), (v1, g1) = plain(embeds), reg(embeds)
  assert float(v0) == float(v1)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pgd_and_smart_are_not_fgm():
  loss, embeds, rng = _loss_of_embeds(), _embeds(), jax.random.key(5)
  values = {m: float(adversarial.regularized_loss(loss, embeds, _cfg(m), rng, divergence_fn=_div)[0])
            for m in ("fgm", "pgd", "smart")}
  assert len({round(v, 6) for v in values.values()}) == 3, values


def test_eps_and_weight_none_take_the_methods_defaults():
  from crossrec_jax import config_defaults  # pylint: disable=import-outside-toplevel
  config = config_defaults.base_config().adversarial
  assert config.method == "none" and config.eps is None and config.weight is None
  for method, (eps, weight) in adversarial.DEFAULTS.items():
    config.method = method
    resolved = adversarial.resolve(config)
    assert (resolved.method, resolved.eps, resolved.weight) == (method, eps, weight)
  config.eps, config.weight = 0.1, 0.3
  assert (adversarial.resolve(config).eps, adversarial.resolve(config).weight) == (0.1, 0.3)


def test_word_embedding_objective_refuses_apr():
  with pytest.raises(ValueError, match="user / item vectors"):
    adversarial.regularized_loss(_loss_of_embeds(), _embeds(), _cfg("apr"), jax.random.key(0))


# -- APR on user / item vectors (the frozen mode) -------------------------------------------------

def _mf():
  k = jax.random.split(jax.random.key(2), 3)
  params = {"user_factors": jax.random.normal(k[0], (6, 4)), "item_factors": jax.random.normal(k[1], (5, 4)),
            "bias": jnp.zeros(())}
  batch = {"user": jnp.array([0, 3, 5]), "item": jnp.array([1, 4, 2]),
           "label": jax.random.normal(k[2], (3,))}

  def loss(p, b, du=None, di=None):  # the hybrid loss's shape: deltas on the vectors it reads
    users = p["user_factors"][b["user"]] + (0 if du is None else du)
    items = p["item_factors"][b["item"]] + (0 if di is None else di)
    return jnp.mean(jnp.square(jnp.sum(users * items, -1) + p["bias"] - b["label"]))
  return loss, params, batch


def test_apr_perturbation_is_eps_per_vector_and_raises_the_loss():
  loss, params, batch = _mf()
  du, di = adversarial.apr_perturbation(loss, params, batch, 3, 3, 4, 0.3)
  np.testing.assert_allclose(np.linalg.norm(du, axis=-1), 0.3, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(di, axis=-1), 0.3, rtol=1e-5)
  assert float(loss(params, batch, du, di)) > float(loss(params, batch))


def test_apr_gradients_are_those_of_loss_plus_w_times_the_adversarial_loss():
  loss, params, batch = _mf()
  w = 0.5
  du, di = adversarial.apr_perturbation(loss, params, batch, 3, 3, 4, 0.3)
  adv, adv_grads = adversarial.apr_gradients(loss, params, batch, 3, 3, 4, 0.3)
  assert float(adv) == pytest.approx(float(loss(params, batch, du, di)), rel=1e-6)
  combined = adversarial.add_weighted(jax.grad(loss)(params, batch), adv_grads, w)
  by_hand = jax.grad(lambda p: loss(p, batch) + w * loss(p, batch, du, di))(params)
  for a, b in zip(jax.tree.leaves(by_hand), jax.tree.leaves(combined)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
  plain = jax.grad(loss)(params, batch)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(adversarial.add_weighted(plain, adv_grads, 0.0))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # w = 0: the plain step


def test_apr_gradients_match_the_frozen_modes_former_inline_apr_bit_for_bit():
  """The APR the frozen mode's step computed inline before it moved here (bench figures with APR
  must not move)."""
  loss, params, batch = _mf()
  eps, n_items = 0.05, 3

  def former(params, batch):
    dim = params["item_factors"].shape[-1]
    zeros_u, zeros_i = jnp.zeros((batch["user"].shape[0], dim)), jnp.zeros((n_items, dim))
    gu, gi = jax.grad(lambda du, di: loss(params, batch, du, di), argnums=(0, 1))(zeros_u, zeros_i)
    scale = lambda g: eps * g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + 1e-12)
    du, di = jax.lax.stop_gradient(scale(gu)), jax.lax.stop_gradient(scale(gi))
    return jax.value_and_grad(lambda p: loss(p, batch, du, di))(params)

  now = jax.jit(lambda p, b: adversarial.apr_gradients(loss, p, b, b["user"].shape[0], n_items,
                                                       p["item_factors"].shape[-1], eps))
  for a, b in zip(jax.tree.leaves(jax.jit(former)(params, batch)), jax.tree.leaves(now(params, batch))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- which method each encoder mode supports: the rest is a one-line config error ------------------

def _config(mode, method, **adv):
  from crossrec_jax import config_defaults  # pylint: disable=import-outside-toplevel
  config = config_defaults.base_config()
  config.encoder_mode, config.adversarial.method = mode, method
  config.adversarial.update(adv)
  return config


@pytest.mark.parametrize("mode,method", [(m, a) for m in adversarial.METHODS_BY_MODE
                                         for a in adversarial.METHODS])
def test_unsupported_combinations_are_refused_in_one_line(mode, method):
  from crossrec_jax import config_check  # pylint: disable=import-outside-toplevel
  from crossrec_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  allowed = adversarial.METHODS_BY_MODE[mode]
  if method in allowed:
    config_check.check_adversarial(_config(mode, method))
    return
  with pytest.raises(ConfigError) as err:
    config_check.validate_config(_config(mode, method))
  message = str(err.value)
  assert "\n" not in message
  assert f"--config.adversarial.method={method}" in message
  assert f"--config.encoder_mode={mode}" in message
  assert f"allowed there: {', '.join(allowed)}" in message


def test_the_modes_supported_methods():
  # frozen: APR on user / item vectors; tune: fgm / pgd on the re-encoded texts' embeddings;
  # end_to_end: every word-embedding method.
  assert adversarial.METHODS_BY_MODE == {"frozen": ("none", "apr"), "tune": ("none", "fgm", "pgd"),
                                         "end_to_end": ("none", "fgm", "pgd", "smart")}


@pytest.mark.parametrize("field,value", [("eps", -0.1), ("weight", 1.5), ("weight", -0.1)])
def test_bad_eps_and_weight_are_refused(field, value):
  from crossrec_jax import config_check  # pylint: disable=import-outside-toplevel
  from crossrec_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  with pytest.raises(ConfigError, match=rf"^--config\.adversarial\.{field}="):
    config_check.check_adversarial(_config("end_to_end", "fgm", **{field: value}))


def test_hybrid_settings_take_apr_from_config_adversarial():
  import types  # pylint: disable=import-outside-toplevel
  from crossrec_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  from crossrec_jax.training.inputs import HybridSettings  # pylint: disable=import-outside-toplevel
  data = types.SimpleNamespace(domains=[{"task": "rating"}])
  off = HybridSettings.from_config(_config("frozen", "none"), data)
  assert off.adversarial == "none"
  assert HybridSettings.from_config(_config("tune", "fgm"), data).adversarial == "none"
  apr = HybridSettings.from_config(_config("frozen", "apr"), data)
  assert (apr.adversarial, apr.adversarial_eps, apr.adversarial_weight) == (
      "apr", *adversarial.DEFAULTS["apr"])
  assert (off.adversarial_eps, off.adversarial_weight) == adversarial.DEFAULTS["apr"]
  set_ = HybridSettings.from_config(_config("frozen", "apr", eps=0.2, weight=0.1), data)
  assert (set_.adversarial_eps, set_.adversarial_weight) == (0.2, 0.1)
  misplaced = _config("frozen", "none")
  misplaced.hybrid.adversarial = "apr"
  with pytest.raises(ConfigError, match="--config.adversarial.method=apr"):
    HybridSettings.from_config(misplaced, data)
