"""The recommender model: logical axes on every parameter, towers, CF fallback, heads, modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from crossrec_jax import sharding
from crossrec_jax.models import CrossDomainRecommender, DomainSpec, RecommenderConfig, testing

DOMAINS = (DomainSpec("books", "rating", 1, 5), DomainSpec("music", "implicit"),
           DomainSpec("movies", "rating", 0.5, 10))


def _model(num_experts=0, **kw):
  cfg = RecommenderConfig(bert=testing.tiny_bert_config(120), domains=DOMAINS, dim=32,
                          user_buckets=16, item_buckets=16, tower_dim=24, retrieval_dim=8,
                          num_experts=num_experts, **kw)
  return CrossDomainRecommender(cfg, rngs=nnx.Rngs(0))


def _batch(b=6, seed=0):
  rng = np.random.default_rng(seed)
  mask = lambda t: (np.arange(t)[None] < rng.integers(2, t + 1, (b, 1))).astype(np.int32)
  return {"user_input_ids": rng.integers(5, 120, (b, 12)).astype(np.int32), "user_attention_mask": mask(12),
          "item_input_ids": rng.integers(5, 120, (b, 7)).astype(np.int32), "item_attention_mask": mask(7),
          "domain": np.arange(b) % 3, "user_bucket": np.array([3, -1, 5, 7, -1, 1][:b]),
          "item_bucket": np.array([-1, 2, 2, 9, 4, -1][:b])}


@pytest.mark.parametrize("num_experts", [0, 3])
def test_every_parameter_has_logical_axes(num_experts):
  model = _model(num_experts)
  state = nnx.state(model, nnx.Param)
  axes = sharding.logical_axes_tree(state)  # raises if any parameter lacks matching axes
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  flat_params = jax.tree.leaves(nnx.to_pure_dict(state))
  assert len(flat_axes) == len(flat_params) > 40
  names = {a for t in flat_axes for a in t if a}
  assert {"embed", "mlp", "heads", "vocab", "domain", "ids"} <= names


@pytest.mark.parametrize("num_experts", [0, 3])
def test_outputs_shapes_ranges_and_modes(num_experts):
  model = _model(num_experts)
  batch = _batch()
  out = model(batch)
  assert {k: v.shape for k, v in out.items()} == {"rating": (6,), "logit": (6,), "retrieval": (6,),
                                                 "user": (6, 32), "item": (6, 32)}
  rating = np.asarray(out["rating"])
  low = np.array([1, 0, 0.5])[batch["domain"]]
  high = np.array([5, 1, 10])[batch["domain"]]
  assert np.all((rating >= low) & (rating <= high))
  again = model(batch)
  np.testing.assert_array_equal(np.asarray(out["rating"]), np.asarray(again["rating"]))
  model.train(rngs=nnx.Rngs(dropout=1))
  train_a = model(batch)
  model.train(rngs=nnx.Rngs(dropout=2))
  train_b = model(batch)
  assert not np.allclose(np.asarray(train_a["user"]), np.asarray(train_b["user"]))
  model.eval()
  np.testing.assert_array_equal(np.asarray(out["rating"]), np.asarray(model(batch)["rating"]))


def test_word_embeddings_input_equals_token_input():
  model = _model()
  batch = _batch()
  embeds = model.embed_tokens(batch)
  np.testing.assert_allclose(np.asarray(model(batch, embeds=embeds)["rating"]),
                             np.asarray(model(batch)["rating"]), rtol=0, atol=0)
  noise = lambda v: v + 0.5 * jax.random.normal(jax.random.key(0), v.shape)  # not a constant: LayerNorm removes shifts
  shifted = {k: noise(v) for k, v in embeds.items()}
  assert not np.allclose(np.asarray(model(batch, embeds=shifted)["rating"]),
                         np.asarray(model(batch)["rating"]))


def test_unknown_ids_fall_back_to_text_alone():
  model = _model()
  batch = _batch()
  text_only = model.encode_users(batch["user_input_ids"], batch["user_attention_mask"])
  fused = model.encode_users(batch["user_input_ids"], batch["user_attention_mask"], batch["user_bucket"])
  known = batch["user_bucket"] >= 0
  np.testing.assert_array_equal(np.asarray(fused)[~known], np.asarray(text_only)[~known])
  assert not np.allclose(np.asarray(fused)[known], np.asarray(text_only)[known])
  no_cf = CrossDomainRecommender(RecommenderConfig(
      bert=testing.tiny_bert_config(120), domains=DOMAINS, dim=32, user_buckets=0, item_buckets=0),
      rngs=nnx.Rngs(0))
  assert no_cf.user_ids is None and no_cf.item_ids is None


def test_per_domain_towers_differ_and_retrieval_is_a_dot_product():
  model = _model()
  batch = _batch()
  out = model(batch)
  users, items = out["user"], out["item"]
  for d in range(3):
    same = dict(batch, domain=np.full(6, d))
    o = model(same)
    up = np.asarray(model.head.project_users(users))[:, d]
    ip = np.asarray(model.head.project_items(items))[:, d]
    np.testing.assert_allclose(np.asarray(o["retrieval"]), np.sum(up * ip, -1), rtol=1e-5, atol=1e-6)
  r0 = model(dict(batch, domain=np.zeros(6, int)))["logit"]
  r1 = model(dict(batch, domain=np.ones(6, int)))["logit"]
  assert not np.allclose(np.asarray(r0), np.asarray(r1))


def test_score_matrix_matches_pairwise_forward():
  model = _model()
  batch = _batch()
  users = model.encode_users(batch["user_input_ids"][:2], batch["user_attention_mask"][:2])
  items = model.encode_items(batch["item_input_ids"][:3], batch["item_attention_mask"][:3])
  matrix = model.score_matrix(users, items, domain=1)
  assert matrix["logit"].shape == (2, 3)
  pair = model.head(users[1:2], items[2:3], jnp.array([1]))
  np.testing.assert_allclose(float(matrix["logit"][1, 2]), float(pair["logit"][0]), rtol=1e-5)


def test_bf16_compute_keeps_fp32_params():
  model = _model(dtype="bfloat16")
  out = model(_batch())
  assert out["rating"].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  assert model.encoder.layers[0].query.dtype == jnp.bfloat16


def test_config_validation():
  with pytest.raises(ValueError, match="task must be one of"):
    DomainSpec("x", "clicks")
  with pytest.raises(ValueError, match="domains is empty"):
    RecommenderConfig(bert=testing.tiny_bert_config(10), domains=())
  cfg = RecommenderConfig(bert=testing.tiny_bert_config(10), domains=DOMAINS)
  assert RecommenderConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(KeyError, match="unknown domain 'games'"):
    cfg.domain_index("games")


@pytest.mark.parametrize("tied", [True, False])
def test_tied_init_starts_retrieval_at_the_encoders_text_similarity(tied):
  """Fresh model, no ID rows: the retrieval score should track the dot product of the pooled
  text vectors (what a sentence encoder is trained for) only when the towers start tied."""
  cfg = RecommenderConfig(bert=testing.tiny_bert_config(120), domains=DOMAINS, dim=256,
                          retrieval_dim=256, tied_init=tied)
  model = CrossDomainRecommender(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  users = rng.integers(5, 120, (12, 10)).astype(np.int32)
  items = rng.integers(5, 120, (12, 6)).astype(np.int32)
  ones = lambda x: np.ones_like(x)
  text = lambda ids: model._text_vector(model.encoder.embed_tokens(ids), ones(ids))
  raw = np.asarray(text(users) @ text(items).T).ravel()
  u = model.head.project_users(model.encode_users(users, ones(users)))[:, 1]
  v = model.head.project_items(model.encode_items(items, ones(items)))[:, 1]
  retrieval = np.asarray(u @ v.T).ravel()
  corr = np.corrcoef(raw, retrieval)[0, 1]
  if tied:
    assert corr > 0.75, corr
  else:
    assert abs(corr) < 0.5, corr
  assert np.array_equal(np.asarray(model.item_projection.kernel.value),
                        np.asarray(model.user_projection.kernel.value)) == tied
