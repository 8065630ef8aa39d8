"""Cross-domain recommender: shared BERT user/item towers + hashed ID embeddings + multi-task head."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from crossrec_jax.models import hf
from crossrec_jax.models.bert import EMBED, BertConfig, BertEncoder, masked_mean
from crossrec_jax.models.heads import MultiTaskHead

TASKS = ("rating", "implicit")
IDS = "ids"  # logical axis of the hashed-ID tables


@dataclasses.dataclass(frozen=True)
class DomainSpec:
  """One platform/domain. ``rating`` domains regress labels in [min_rating, max_rating];
  ``implicit`` domains predict interaction probability and rank the catalog."""
  name: str
  task: str = "rating"
  min_rating: float = 1.0
  max_rating: float = 5.0

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f"domain {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
    if self.task == "rating" and not self.min_rating < self.max_rating:
      raise ValueError(f"domain {self.name!r}: min_rating {self.min_rating} must be below "
                       f"max_rating {self.max_rating}")


@dataclasses.dataclass(frozen=True)
class RecommenderConfig:
  bert: BertConfig
  domains: tuple[DomainSpec, ...]
  dim: int = 256                 # fused user/item vector size
  pooling: str = "mean"          # mean | cls | pooler
  user_buckets: int = 0          # hashed user-ID embedding rows; 0 disables CF for users
  item_buckets: int = 0
  tower_dim: int = 128
  retrieval_dim: int = 64
  num_experts: int = 0           # > 0: MMoE shared experts with per-domain gates
  tied_init: bool = False        # user and item projections start equal (see __init__)
  dtype: str = "float32"         # compute dtype; parameters stay float32

  def __post_init__(self):
    if not self.domains:
      raise ValueError("RecommenderConfig.domains is empty: list at least one domain")
    names = [d.name for d in self.domains]
    if len(set(names)) != len(names):
      raise ValueError(f"duplicate domain names in {names}")
    if self.pooling not in ("mean", "cls", "pooler"):
      raise ValueError(f"pooling must be mean, cls or pooler, got {self.pooling!r}")

  @property
  def domain_names(self) -> tuple[str, ...]:
    return tuple(d.name for d in self.domains)

  def domain_index(self, name: str) -> int:
    try:
      return self.domain_names.index(name)
    except ValueError:
      raise KeyError(f"unknown domain {name!r}; the model knows {list(self.domain_names)}") from None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_config(cls, config, *, bert: BertConfig,
                  domains: Sequence[DomainSpec]) -> "RecommenderConfig":
    """A run's model from its config (``config.model``), its encoder's and its data's domains."""
    return cls(bert=bert, domains=tuple(domains), **cls.options_from_config(config))

  @classmethod
  def options_from_config(cls, config) -> dict[str, Any]:
    """Every field but ``bert`` and ``domains``, from ``config.model`` (for
    ``CrossDomainRecommender.from_pretrained``, which reads ``bert`` from the checkpoint)."""
    return {f.name: config.model[f.name] for f in dataclasses.fields(cls)
            if f.name not in ("bert", "domains")}

  @classmethod
  def from_dict(cls, raw: dict[str, Any]) -> "RecommenderConfig":
    raw = dict(raw)
    raw["bert"] = BertConfig.from_dict(dict(raw["bert"]))
    raw["domains"] = tuple(DomainSpec(**d) for d in raw["domains"])
    return cls(**raw)


class CrossDomainRecommender(nnx.Module):
  """``__call__(batch)`` -> dict(rating, logit, retrieval, user, item) for each example.

  ``batch`` keys: ``user_input_ids``/``user_attention_mask`` (profile text),
  ``item_input_ids``/``item_attention_mask`` (item text), ``domain`` (index into
  ``config.domains``) and optionally ``user_bucket``/``item_bucket`` (hashed ID rows, -1 for
  IDs unseen in training: those fall back to text alone). Built in eval mode; see ``bert.py``
  for ``train()``/``eval()``.
  """

  def __init__(self, config: RecommenderConfig, *, encoder: BertEncoder | None = None,
               rngs: nnx.Rngs):
    self.config = config
    dtype = jnp.dtype(config.dtype)
    if encoder is not None and jnp.dtype(encoder.embeddings.layer_norm.dtype) != dtype:
      raise ValueError(f"encoder computes in {encoder.embeddings.layer_norm.dtype}, the config "
                       f"asks for {dtype}: build it with dtype={config.dtype!r}")
    self.encoder = encoder if encoder is not None else BertEncoder(config.bert, dtype=dtype, rngs=rngs)
    hidden = config.bert.hidden_size
    proj = lambda: nnx.Linear(hidden, config.dim, dtype=dtype, rngs=rngs,
                              kernel_metadata={"logical_axes": (EMBED, "fused")},
                              bias_metadata={"logical_axes": ("fused",)})
    self.user_projection, self.item_projection = proj(), proj()
    ids = lambda n: nnx.Embed(n, config.dim, dtype=dtype, rngs=rngs,
                              embedding_init=nnx.initializers.normal(0.02),
                              embedding_metadata={"logical_axes": (IDS, "fused")})
    self.user_ids = ids(config.user_buckets) if config.user_buckets else None
    self.item_ids = ids(config.item_buckets) if config.item_buckets else None
    ranges = [(d.min_rating, d.max_rating) if d.task == "rating" else (0.0, 1.0)
              for d in config.domains]
    self.head = MultiTaskHead(config.dim, len(config.domains), tower_dim=config.tower_dim,
                              retrieval_dim=config.retrieval_dim, num_experts=config.num_experts,
                              rating_ranges=ranges, dtype=dtype, rngs=rngs)
    if config.tied_init:
      # With the same random projections on both sides, the untrained retrieval score is a
      # Johnson-Lindenstrauss estimate of the encoder's own user-item text similarity, so a
      # sentence encoder ranks cold users zero-shot from step 0. The copies train apart.
      self.item_projection.kernel.value = jnp.array(self.user_projection.kernel.value)
      self.head.item_retrieval.value = jnp.array(self.head.user_retrieval.value)

  @classmethod
  def from_pretrained(cls, checkpoint: str = hf.DEFAULT_CHECKPOINT, *,
                      domains: Sequence[DomainSpec], seed: int = 0, **kwargs):
    """BERT weights from a Hugging Face checkpoint; towers, ID tables and head freshly initialised."""
    config = RecommenderConfig(bert=hf.load_bert_config(checkpoint), domains=tuple(domains), **kwargs)
    encoder = hf.load_bert(checkpoint, dtype=jnp.dtype(config.dtype), seed=seed)
    return cls(config, encoder=encoder, rngs=nnx.Rngs(seed + 1))

  # -- towers -----------------------------------------------------------------------------------
  def embed_tokens(self, batch) -> dict[str, jax.Array]:
    """Word embeddings of the user and item texts (what adversarial training perturbs)."""
    return {"user": self.encoder.embed_tokens(batch["user_input_ids"]),
            "item": self.encoder.embed_tokens(batch["item_input_ids"])}

  def _text_vector(self, embeds, mask):
    hidden, pooled = self.encoder(attention_mask=mask, inputs_embeds=embeds)
    if self.config.pooling == "mean":
      return masked_mean(hidden, mask)
    return pooled if self.config.pooling == "pooler" else hidden[:, 0]

  @staticmethod
  def _fuse(text_vector, table, bucket):
    if table is None or bucket is None:
      return text_vector
    known = (bucket >= 0)[:, None]
    return text_vector + jnp.where(known, table(jnp.maximum(bucket, 0)), 0.0)

  def encode_users(self, input_ids=None, attention_mask=None, bucket=None, *, embeds=None):
    if embeds is None:
      embeds = self.encoder.embed_tokens(input_ids)
    text = self.user_projection(self._text_vector(embeds, attention_mask))
    return self._fuse(text, self.user_ids, bucket).astype(jnp.float32)

  def encode_items(self, input_ids=None, attention_mask=None, bucket=None, *, embeds=None):
    if embeds is None:
      embeds = self.encoder.embed_tokens(input_ids)
    text = self.item_projection(self._text_vector(embeds, attention_mask))
    return self._fuse(text, self.item_ids, bucket).astype(jnp.float32)

  # -- scoring ----------------------------------------------------------------------------------
  def __call__(self, batch, *, embeds=None):
    if embeds is None:
      embeds = self.embed_tokens(batch)
    user = self.encode_users(attention_mask=batch["user_attention_mask"],
                             bucket=batch.get("user_bucket"), embeds=embeds["user"])
    item = self.encode_items(attention_mask=batch["item_attention_mask"],
                             bucket=batch.get("item_bucket"), embeds=embeds["item"])
    return self.head(user, item, batch["domain"]) | {"user": user, "item": item}

  def score_matrix(self, users, items, domain: int):
    """All user x item outputs for one domain from encoded vectors: dict of [U, I] arrays."""
    u = jnp.repeat(users, items.shape[0], axis=0)
    v = jnp.tile(items, (users.shape[0], 1))
    out = self.head(u, v, jnp.full((u.shape[0],), domain, jnp.int32))
    return {k: x.reshape(users.shape[0], items.shape[0]) for k, x in out.items()}
