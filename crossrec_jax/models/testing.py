"""Small generated BERT checkpoints (weights + WordPiece vocab) for tests and smoke runs.

They go through the same loading code as real checkpoints: ``config.json`` +
``model.safetensors`` + ``vocab.txt`` in a directory.
"""

from __future__ import annotations

import functools
import json
import pathlib
import string
from typing import Iterable

import numpy as np
from flax import nnx

from crossrec_jax.models import hf
from crossrec_jax.models.bert import BertConfig, BertEncoder

# Encoder shapes used by tests and benchmarks (random weights where no checkpoint is at hand).
BERT_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_BASE_WORDS = """the a of and in to with for on by is at from his her their new old love story
life world war night day man woman girl boy city house time dark light blue red black white
music song album jazz rock pop classical book novel movie film series guide art office paper
pen tape ink paint brush craft rating user history likes rated domain item title genre""".split()


def tiny_vocab(extra_words: Iterable[str] = ()) -> list[str]:
  """Specials, single characters and their ``##`` continuations (so any ASCII text
  tokenizes), digits/punctuation and a few whole words."""
  chars = list(string.ascii_lowercase + string.digits + string.punctuation)
  words = dict.fromkeys([*_BASE_WORDS, *(w.lower() for w in extra_words)])
  return [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars),
          *(w for w in words if w not in chars)]


def tiny_bert_config(vocab_size: int, **overrides) -> BertConfig:
  defaults = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
  return BertConfig(**(defaults | overrides))


def random_bert_tensors(cfg: BertConfig, seed: int = 0, *, pooler: bool = True) -> dict[str, np.ndarray]:
  """Hugging Face-named random tensors for ``cfg`` (torch layout: Linear weight is [out, in])."""
  abstract = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  rng = np.random.default_rng(seed)
  tensors = {}
  for hf_name, path, transpose in hf.param_map(cfg):
    if not pooler and hf_name.startswith("pooler."):
      continue
    shape = functools.reduce(lambda node, key: node[key], path, shapes).shape
    shape = shape[::-1] if transpose else shape
    if hf_name.endswith("LayerNorm.weight"):
      tensors[hf_name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:  # larger than the 0.02 init so that numerical mismatches would show
      tensors[hf_name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
  return tensors


def write_checkpoint(directory, cfg: BertConfig, tensors: dict[str, np.ndarray],
                     vocab: list[str] | None = None, *, prefix: str = "") -> pathlib.Path:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(cfg.to_dict() | {"architectures": ["BertModel"]}))
  save_file({prefix + k: v for k, v in tensors.items()}, str(directory / "model.safetensors"))
  if vocab is not None:
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length":
         cfg.max_position_embeddings}))
  return directory


def write_tiny_checkpoint(directory, *, seed: int = 0, extra_words: Iterable[str] = (),
                          **config_overrides) -> pathlib.Path:
  """A complete tiny BERT checkpoint directory (random weights, small WordPiece vocab)."""
  vocab = tiny_vocab(extra_words)
  cfg = tiny_bert_config(len(vocab), **config_overrides)
  return write_checkpoint(directory, cfg, random_bert_tensors(cfg, seed), vocab)
