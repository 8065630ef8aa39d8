"""BERT encoder in flax.nnx, numerically matching transformers' ``BertModel``.

Attribute names follow the Hugging Face checkpoint layout so that ``hf.py`` can map
tensors one to one. Every parameter carries ``logical_axes`` metadata; ``sharding.py``
turns those names into mesh placements.

Modules are built in eval mode (dropout off). ``model.train(rngs=nnx.Rngs(dropout=key))``
switches dropout on and hands every ``Dropout`` the same stream, so the masks are drawn in
call order from ``key``; ``model.eval()`` switches it off again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axis names used by the whole library (see sharding.py for the rules).
EMBED, MLP, HEADS, VOCAB, POSITIONS, TYPES = "embed", "mlp", "heads", "vocab", "positions", "types"


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pad_token_id: int = 0

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "BertConfig":
    """Builds from a Hugging Face ``config.json`` dict, ignoring unrelated keys."""
    model_type = raw.get("model_type", "bert")
    if model_type not in ("bert",):
      raise ValueError(
          f"{source}: model_type {model_type!r} is not BERT; crossrec_jax loads BERT-family "
          "checkpoints (model_type 'bert'). Use a BERT checkpoint such as all-MiniLM-L6-v2.")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{source}: only absolute position embeddings are supported, got "
                       f"{raw['position_embedding_type']!r}.")
    if raw.get("hidden_act", "gelu") not in _ACTIVATIONS:
      raise ValueError(f"{source}: hidden_act {raw['hidden_act']!r} is not one of "
                       f"{sorted(_ACTIVATIONS)}.")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in names and v is not None})

  @classmethod
  def from_json_file(cls, path) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_dict(json.load(f), source=str(path))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self) | {"model_type": "bert"}


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def _dense(cfg: BertConfig, din: int, dout: int, axes: tuple[str, str], dtype, rngs) -> nnx.Linear:
  init = nnx.initializers.normal(cfg.initializer_range)
  return nnx.Linear(din, dout, dtype=dtype, kernel_init=init, rngs=rngs,
                    kernel_metadata={"logical_axes": axes},
                    bias_metadata={"logical_axes": (axes[1],)})


def _layer_norm(cfg: BertConfig, dtype, rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, rngs=rngs,
                       scale_metadata={"logical_axes": (EMBED,)},
                       bias_metadata={"logical_axes": (EMBED,)})


def _embed(cfg: BertConfig, num: int, axis: str, dtype, rngs) -> nnx.Embed:
  return nnx.Embed(num, cfg.hidden_size, dtype=dtype, rngs=rngs,
                   embedding_init=nnx.initializers.normal(cfg.initializer_range),
                   embedding_metadata={"logical_axes": (axis, EMBED)})


def _dropout(rate: float) -> nnx.Dropout:
  # Eval mode until ``train()``, which also supplies the rngs (none are stored before, so the
  # model's state is its parameters alone).
  return nnx.Dropout(rate, deterministic=True)


class BertEmbeddings(nnx.Module):

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.word_embeddings = _embed(cfg, cfg.vocab_size, VOCAB, dtype, rngs)
    self.position_embeddings = _embed(cfg, cfg.max_position_embeddings, POSITIONS, dtype, rngs)
    self.token_type_embeddings = _embed(cfg, cfg.type_vocab_size, TYPES, dtype, rngs)
    self.layer_norm = _layer_norm(cfg, dtype, rngs)
    self.dropout = _dropout(cfg.hidden_dropout_prob)

  def __call__(self, inputs_embeds, token_type_ids):
    seq_len = inputs_embeds.shape[1]
    positions = jnp.arange(seq_len)[None, :]
    x = (inputs_embeds + self.position_embeddings(positions)
         + self.token_type_embeddings(token_type_ids))
    return self.dropout(self.layer_norm(x))


class BertLayer(nnx.Module):

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    h, m = cfg.hidden_size, cfg.intermediate_size
    if h % cfg.num_attention_heads:
      raise ValueError(f"hidden_size {h} is not divisible by num_attention_heads "
                       f"{cfg.num_attention_heads}")
    self.num_heads = cfg.num_attention_heads
    self.query = _dense(cfg, h, h, (EMBED, HEADS), dtype, rngs)
    self.key = _dense(cfg, h, h, (EMBED, HEADS), dtype, rngs)
    self.value = _dense(cfg, h, h, (EMBED, HEADS), dtype, rngs)
    self.attention_output = _dense(cfg, h, h, (HEADS, EMBED), dtype, rngs)
    self.attention_layer_norm = _layer_norm(cfg, dtype, rngs)
    self.intermediate = _dense(cfg, h, m, (EMBED, MLP), dtype, rngs)
    self.output = _dense(cfg, m, h, (MLP, EMBED), dtype, rngs)
    self.output_layer_norm = _layer_norm(cfg, dtype, rngs)
    self.activation = _ACTIVATIONS[cfg.hidden_act]
    self.dropout = _dropout(cfg.hidden_dropout_prob)
    self.attention_dropout = _dropout(cfg.attention_probs_dropout_prob)

  def _attention(self, x, mask):
    b, t, h = x.shape
    split = lambda y: y.reshape(b, t, self.num_heads, h // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    key_mask = mask[:, None, None, :].astype(bool)  # [B, 1, 1(query), T(key)]
    if self.attention_dropout.deterministic or self.attention_dropout.rate == 0.0:
      # Fused kernel (cuDNN flash attention on GPU where shapes allow, XLA elsewhere).
      out = jax.nn.dot_product_attention(q, k, v, mask=key_mask)
    else:
      # Attention-probability dropout has no fused equivalent, so spell it out.
      logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(h // self.num_heads)
      logits = jnp.where(key_mask, logits, jnp.finfo(logits.dtype).min)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
      probs = self.attention_dropout(probs)
      out = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    return out.reshape(b, t, h)

  def __call__(self, x, mask):
    attn = self.attention_output(self._attention(x, mask))
    x = self.attention_layer_norm(x + self.dropout(attn))
    y = self.output(self.activation(self.intermediate(x)))
    return self.output_layer_norm(x + self.dropout(y))


class BertPooler(nnx.Module):

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.dense = _dense(cfg, cfg.hidden_size, cfg.hidden_size, (EMBED, EMBED), dtype, rngs)

  def __call__(self, hidden):
    return jnp.tanh(self.dense(hidden[:, 0]))


def masked_mean(hidden, mask):
  """[B, T, H] -> [B, H]: the mean of ``hidden`` over the real tokens (``mask`` 1), the text
  vector sentence encoders such as all-MiniLM-L6-v2 are trained with. The one mean pooling of
  the package (text cache, tune mode, recommender towers)."""
  m = mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class BertEncoder(nnx.Module):
  """``BertModel`` equivalent: returns (last_hidden_state, pooled_output).

  ``inputs_embeds`` replaces the word-embedding lookup so that a regularizer can perturb
  the embeddings it differentiates through (see ``adversarial.py``).
  """

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.pooler = BertPooler(cfg, dtype=dtype, rngs=rngs)

  def embed_tokens(self, input_ids):
    return self.embeddings.word_embeddings(input_ids)

  def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, *,
               inputs_embeds=None):
    if inputs_embeds is None:
      if input_ids is None:
        raise ValueError("pass input_ids or inputs_embeds")
      inputs_embeds = self.embed_tokens(input_ids)
    shape = inputs_embeds.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones(shape, jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros(shape, jnp.int32)
    x = self.embeddings(inputs_embeds, token_type_ids)
    for layer in self.layers:
      x = layer(x, attention_mask)
    return x, self.pooler(x)
