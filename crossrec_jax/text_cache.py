"""Frozen-encoder text vectors, computed once and cached on disk (the frozen encoder mode).

``TextEncoder(checkpoint).encode(texts, max_length)`` runs the pretrained BERT forward only, in
jitted batches sharded over the devices' ``data`` axis, and mean-pools the last hidden state
(the pooling sentence encoders such as all-MiniLM-L6-v2 are trained with). Texts are sorted by
token length and padded per batch to a multiple of 8 tokens, so short titles do not pay for the
longest one. ``cached_vectors`` keys the result by the checkpoint's weights, the max length and
the texts themselves, so a second run (or another model on the same data) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crossrec_jax.models import hf

DEFAULT_CACHE_DIR = os.environ.get(
    "CROSSREC_CACHE_DIR", str(pathlib.Path("~/.cache/crossrec_jax/text_vectors").expanduser()))
CACHE_FORMAT = 1  # bump when the pooling or the layout of the cached arrays changes


def _pad_to(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def mean_pooled(encoder, ids, mask):
  """The text vector sentence encoders such as all-MiniLM-L6-v2 are trained with: the mean of
  the last hidden state over the real tokens."""
  hidden, _ = encoder(ids, mask)
  m = mask.astype(hidden.dtype)[..., None]
  return jnp.sum(hidden * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


class TextEncoder:
  """The frozen encoder of ``checkpoint`` as a bulk text -> vector function (``encoder``: the
  same architecture with other weights, e.g. tuned by the tune mode)."""

  def __init__(self, checkpoint: str, *, batch_size: int = 128, devices=None, encoder=None):
    self.directory = hf.resolve_checkpoint(checkpoint)
    self.encoder = encoder if encoder is not None else hf.load_bert(self.directory)
    self.tokenizer = hf.load_tokenizer(self.directory)
    self.dim = self.encoder.config.hidden_size
    devices = np.asarray(devices if devices is not None else jax.devices())
    self.mesh = Mesh(devices.reshape(-1), ("data",))
    self.batch_size = _pad_to(batch_size, devices.size)
    graphdef, params = nnx.split(self.encoder)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._params = jax.device_put(params, replicated)
    batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

    @jax.jit
    def forward(params, ids, mask):
      return mean_pooled(nnx.merge(graphdef, params), ids, mask)

    self._forward = lambda ids, mask: forward(
        self._params, jax.device_put(ids, batch_sharding), jax.device_put(mask, batch_sharding))

  def fingerprint(self) -> str:
    """Identifies the weights: config + size and mtime of the safetensors file."""
    weights = self.directory / "model.safetensors"
    stat = weights.stat()
    stamp = [self.encoder.config.to_dict(), str(weights.resolve()), stat.st_size, stat.st_mtime_ns]
    return hashlib.sha256(json.dumps(stamp, sort_keys=True, default=str).encode()).hexdigest()[:16]

  def encode(self, texts: Sequence[str], max_length: int, progress: bool = False) -> np.ndarray:
    """[len(texts), hidden] float32, in the order of ``texts``."""
    texts = [t if t else "[empty]" for t in texts]
    out = np.zeros((len(texts), self.dim), np.float32)
    if not texts:
      return out
    ids = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False,
                         return_token_type_ids=False, return_attention_mask=False)["input_ids"]
    lengths = np.array([len(x) for x in ids])
    order = np.argsort(lengths, kind="stable")
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
      bar = tqdm(total=len(texts), desc=f"encode (max {max_length} tokens)", unit="text")
    for start in range(0, len(texts), self.batch_size):
      rows = order[start:start + self.batch_size]
      width = _pad_to(int(lengths[rows].max()), 8)
      batch_ids = np.zeros((self.batch_size, width), np.int32)
      batch_mask = np.zeros((self.batch_size, width), np.int32)
      for k, r in enumerate(rows):
        batch_ids[k, :lengths[r]] = ids[r]
        batch_mask[k, :lengths[r]] = 1
      out[rows] = np.asarray(self._forward(batch_ids, batch_mask))[:len(rows)]
      if bar is not None:
        bar.update(len(rows))
    if bar is not None:
      bar.close()
    return out


def cache_key(encoder_fingerprint: str, texts: Sequence[str], max_length: int) -> str:
  h = hashlib.sha256(f"{CACHE_FORMAT}|{encoder_fingerprint}|{max_length}|{len(texts)}".encode())
  for t in texts:
    h.update(t.encode("utf-8", "surrogatepass"))
    h.update(b"\0")
  return h.hexdigest()[:24]


def cached_vectors(checkpoint: str, texts: Sequence[str], max_length: int, *,
                   cache_dir: str | os.PathLike | None = None, encoder: TextEncoder | None = None,
                   progress: bool = True) -> np.ndarray:
  """Text vectors of ``texts`` from the cache, encoding (and caching) them when missing.

  The cache file is written under a temporary name and renamed, so an interrupted run never
  leaves a truncated file under a final name.
  """
  encoder = encoder or TextEncoder(checkpoint)
  # epath: a gs://bucket/run/text_cache cache_dir stays in the bucket (pathlib: gs:/bucket/...),
  # hence open() rather than np.load / np.save / os.replace on the path.
  directory = epath.Path(cache_dir or DEFAULT_CACHE_DIR)
  path = directory / f"{cache_key(encoder.fingerprint(), texts, max_length)}.npy"
  if path.is_file():
    try:
      with path.open("rb") as f:
        vectors = np.load(f, allow_pickle=False)
      if vectors.shape == (len(texts), encoder.dim):
        return vectors
    except (ValueError, OSError):
      pass  # unreadable cache file: encode again and replace it
  vectors = encoder.encode(texts, max_length, progress=progress)
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    with tmp.open("wb") as f:
      np.save(f, vectors, allow_pickle=False)
    tmp.replace(path)  # os.replace locally; a bucket: copy + delete
  return vectors
