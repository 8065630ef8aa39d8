"""The Flax encoder matches transformers' PyTorch BertModel (max abs diff <= 1e-5)."""

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from crossrec_jax.models import hf, testing  # pylint: disable=wrong-import-position

# Measured: 1-2e-6 (MiniLM and the random tiny BERT, float32 on CPU). 1e-5 leaves a 5x margin
# yet fails on real mistakes: dropping the LayerNorm eps alone gives 1.9e-5 on the tiny model.
TOLERANCE = 1e-5
TEXTS = ["user history: rated 5 the dark city, rated 2 blue jazz album",
         "a short one", "office paper pen tape and ink for the art room, many words here"]


def _compare(directory, capsys, label):
  model = hf.load_bert(directory)
  tokenizer = hf.load_tokenizer(directory)
  enc = tokenizer(TEXTS, padding=True, return_tensors="np")
  token_types = np.zeros_like(enc["input_ids"])
  token_types[:, enc["input_ids"].shape[1] // 2:] = 1  # exercise the token-type table too
  hidden, pooled = model(enc["input_ids"], enc["attention_mask"], token_types)
  reference = transformers.BertModel.from_pretrained(str(directory)).eval()
  with torch.no_grad():
    out = reference(input_ids=torch.tensor(enc["input_ids"]),
                    attention_mask=torch.tensor(enc["attention_mask"]),
                    token_type_ids=torch.tensor(token_types))
  # Real tokens only: outputs at padding positions are never read (mean pooling masks them).
  real = enc["attention_mask"][..., None].astype(bool)
  hidden_diff = float(np.abs(np.where(real, np.asarray(hidden) - out.last_hidden_state.numpy(), 0)).max())
  pooled_diff = float(np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max())
  with capsys.disabled():
    print(f"\n[parity {label}] last_hidden_state max abs diff {hidden_diff:.2e}, "
          f"pooled max abs diff {pooled_diff:.2e} (tolerance {TOLERANCE:.0e})")
  assert hidden_diff <= TOLERANCE, f"{label}: last_hidden_state differs by {hidden_diff:.2e}"
  assert pooled_diff <= TOLERANCE, f"{label}: pooled output differs by {pooled_diff:.2e}"


def test_parity_embedded_minilm(capsys):
  _compare(hf.resolve_checkpoint(hf.DEFAULT_CHECKPOINT), capsys, "all-MiniLM-L6-v2")


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_parity_random_checkpoint(tmp_path, capsys, prefix):
  vocab = testing.tiny_vocab()
  cfg = testing.tiny_bert_config(len(vocab), hidden_act="gelu")
  tensors = testing.random_bert_tensors(cfg, seed=3)
  testing.write_checkpoint(tmp_path, cfg, tensors, vocab, prefix=prefix)
  if prefix:  # transformers reads "bert."-prefixed files through a BertFor* class; compare via ours
    from safetensors.numpy import load_file
    assert all(k.startswith("bert.") for k in load_file(str(tmp_path / "model.safetensors")))
    plain = tmp_path / "plain"
    testing.write_checkpoint(plain, cfg, tensors, vocab)
    ours = np.asarray(hf.load_bert(tmp_path)(np.array([[2, 40, 50, 3]]))[0])
    np.testing.assert_array_equal(ours, np.asarray(hf.load_bert(plain)(np.array([[2, 40, 50, 3]]))[0]))
    _compare(plain, capsys, "random tiny BERT, bert. prefix")
  else:
    _compare(tmp_path, capsys, "random tiny BERT")


def test_checkpoint_without_pooler_loads(tmp_path):
  vocab = testing.tiny_vocab()
  cfg = testing.tiny_bert_config(len(vocab))
  testing.write_checkpoint(tmp_path, cfg, testing.random_bert_tensors(cfg, pooler=False), vocab)
  model = hf.load_bert(tmp_path)
  hidden, pooled = model(np.array([[2, 10, 3]]))
  assert hidden.shape == (1, 3, cfg.hidden_size) and pooled.shape == (1, cfg.hidden_size)
  # Filled on the host, nothing initialised on a device (a fresh pooler included).
  assert all(type(x) is np.ndarray and x.dtype == np.float32
             for x in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model))))
