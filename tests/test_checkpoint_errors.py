"""Bad Hugging Face checkpoints raise CheckpointError naming the file / tensor and the fix."""

import json

import numpy as np
import pytest

from crossrec_jax.models import CheckpointError, hf, testing


@pytest.fixture()
def good(tmp_path):
  vocab = testing.tiny_vocab()
  cfg = testing.tiny_bert_config(len(vocab))
  return testing.write_checkpoint(tmp_path / "ckpt", cfg, testing.random_bert_tensors(cfg), vocab)


def test_good_checkpoint_loads(good):
  assert hf.load_bert(good).config.hidden_size == 64


def test_missing_directory(tmp_path):
  with pytest.raises(CheckpointError, match=r"no_such_dir: checkpoint directory does not exist"):
    hf.load_bert(tmp_path / "no_such_dir")


def test_missing_weights(good):
  (good / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
    hf.load_bert(good)


def test_missing_config(good):
  (good / "config.json").unlink()
  with pytest.raises(CheckpointError, match=r"config\.json: missing"):
    hf.load_bert(good)


def test_pickle_bin_refused(good):
  (good / "model.safetensors").unlink()
  (good / "pytorch_model.bin").write_bytes(b"\x80\x04 not loaded")
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: PyTorch pickle weights are refused.*safe_serialization=True"):
    hf.load_bert(good)


def test_wrong_shape_names_tensor(good):
  cfg = json.loads((good / "config.json").read_text())
  cfg["intermediate_size"] = 96  # weights were written for 128
  (good / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"tensor 'encoder\.layer\.0\.intermediate\.dense\.weight' has shape \(128, 64\).*\(96, 64\)"):
    hf.load_bert(good)


def test_missing_tensor_named(good):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(good / "model.safetensors"))
  del tensors["encoder.layer.1.output.LayerNorm.weight"]
  save_file(tensors, str(good / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"'encoder\.layer\.1\.output\.LayerNorm\.weight' is missing"):
    hf.load_bert(good)


def test_not_bert_config(good):
  (good / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
  with pytest.raises(CheckpointError, match=r"config\.json: model_type 'gpt2' is not BERT"):
    hf.load_bert(good)


def test_not_bert_tensors(good):
  from safetensors.numpy import save_file
  save_file({"h.0.attn.c_attn.weight": np.zeros((4, 4), np.float32)}, str(good / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'embeddings\.word_embeddings\.weight' not found; this is not a BERT"):
    hf.load_bert(good)


def test_corrupt_safetensors(good):
  (good / "model.safetensors").write_bytes(b"garbage, not a safetensors header")
  with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
    hf.load_bert(good)


def test_invalid_config_json(good):
  (good / "config.json").write_text("{ not json")
  with pytest.raises(CheckpointError, match=r"config\.json: not a valid BERT config\.json"):
    hf.load_bert(good)


def test_missing_tokenizer(good):
  (good / "vocab.txt").unlink()
  with pytest.raises(CheckpointError, match=r"no tokenizer\.json or vocab\.txt"):
    hf.load_tokenizer(good)


def test_hub_id_offline_is_clear(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(CheckpointError, match=r"could not be fetched from the Hugging Face hub.*pass the local directory"):
    hf.resolve_checkpoint("someone/not-a-local-dir")


def test_checkpoint_from_before_a_new_init_option_is_still_compatible(tmp_path):
  import json as json_  # pylint: disable=import-outside-toplevel
  from crossrec_jax import checkpoint as ckpt  # pylint: disable=import-outside-toplevel
  from crossrec_jax.models import DomainSpec, RecommenderConfig, testing  # pylint: disable=import-outside-toplevel
  config = RecommenderConfig(bert=testing.tiny_bert_config(50), domains=(DomainSpec("books"),))
  current = {"model": json_.loads(json_.dumps(config.to_dict(), default=list))}
  older = {"model": {k: v for k, v in current["model"].items() if k != "tied_init"}}
  ckpt._check_compatible(tmp_path, older, current)  # pylint: disable=protected-access
  other = {"model": dict(older["model"], dim=64)}
  with pytest.raises(ckpt.CheckpointIncompatibleError, match=r"differs in \['dim'\]"):
    ckpt._check_compatible(tmp_path, other, current)  # pylint: disable=protected-access
