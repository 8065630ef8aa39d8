"""Text -> vector in bulk, and the frozen encoder mode's vectors cached on disk.

``encode_in_batches`` is the package's one batch-and-encode loop (used here, by the Scorer and
by the evaluator's catalog): token lists go shortest first into fixed-size batches, each padded
to a width of its own, so short titles do not pay for the longest text.

``TextEncoder(checkpoint).encode(texts, max_length)`` runs the pretrained BERT forward only, in
jitted batches sharded over the devices' ``data`` axis, and mean-pools the last hidden state
(``models.bert.masked_mean``), each batch padded to a multiple of 8 tokens.
``cached_vectors`` keys the result by the checkpoint's weights, the max length and the texts
themselves, so a second run (or another model on the same data) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from crossrec_jax.models import hf
from crossrec_jax.models.bert import masked_mean

DEFAULT_CACHE_DIR = os.environ.get(
    "CROSSREC_CACHE_DIR", str(pathlib.Path("~/.cache/crossrec_jax/text_vectors").expanduser()))
CACHE_FORMAT = 1  # bump when the pooling or the layout of the cached arrays changes


def _pad_to(n: int, multiple: int) -> int:
  return max(multiple, -(-n // multiple) * multiple)


def encode_in_batches(forward: Callable[..., object], token_ids: Sequence[Sequence[int]], dim: int,
                      batch_size: int, *, width: Callable[[int], int],
                      one_width_per_batch: bool = False,
                      extra: Mapping[str, np.ndarray] | None = None,
                      progress: str | None = None) -> np.ndarray:
  """[len(token_ids), dim] float32: ``forward(ids, mask, **extra_rows)`` -> [batch_size, dim]
  over every token list, returned in the order of ``token_ids``.

  Rows go shortest first; a batch is ``batch_size`` rows (the last filled with copies of its
  first row, whose results are dropped) of ``width(its longest row)`` tokens (``width``:
  non-decreasing in the token count, at least that count), so the jitted
  ``forward`` compiles once per width, never per batch. ``one_width_per_batch``: a batch also
  ends where ``width`` of the next row differs (fixed length buckets: each row is encoded at
  the width of its own bucket). ``extra``: per-row arrays cut into batches alongside (hashed ID
  buckets). ``progress``: a tqdm bar's title.
  """
  out = np.zeros((len(token_ids), dim), np.float32)
  lengths = np.array([len(t) for t in token_ids], np.int64)
  order = np.argsort(lengths, kind="stable")
  widths = np.array([width(int(n)) for n in lengths[order]])
  bar = None
  if progress and len(order):
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(order), desc=progress, unit="text")
  start = 0
  while start < len(order):
    stop = min(start + batch_size, len(order))
    if one_width_per_batch:
      stop = start + int(np.argmax(np.append(widths[start:stop] != widths[start], True)))
    rows = order[start:stop]
    w = int(widths[stop - 1])  # sorted by length: the batch's longest row is its last
    ids = np.zeros((batch_size, w), np.int32)
    mask = np.zeros((batch_size, w), np.int32)
    for k, r in enumerate(rows):
      ids[k, :lengths[r]] = token_ids[r]
      mask[k, :lengths[r]] = 1
    ids[len(rows):], mask[len(rows):] = ids[0], mask[0]
    fill = np.full(batch_size - len(rows), rows[0])
    batch_extra = {k: np.asarray(v)[np.concatenate([rows, fill])] for k, v in (extra or {}).items()}
    out[rows] = np.asarray(forward(ids, mask, **batch_extra))[:len(rows)]
    if bar is not None:
      bar.update(len(rows))
    start = stop
  if bar is not None:
    bar.close()
  return out


class TextEncoder:
  """The frozen encoder of ``checkpoint`` as a bulk text -> vector function (``encoder``: the
  same architecture with other weights, e.g. tuned by the tune mode)."""

  def __init__(self, checkpoint: str, *, batch_size: int = 128, devices=None, encoder=None):
    self.directory = hf.resolve_checkpoint(checkpoint)
    self.encoder = encoder if encoder is not None else hf.load_bert(self.directory)
    self.tokenizer = hf.load_tokenizer(self.directory)
    self.dim = self.encoder.config.hidden_size
    # This process's devices: every host of a multi-host run encodes (and caches) the whole
    # catalog itself, so the vectors are plain local arrays on each.
    devices = np.asarray(devices if devices is not None else jax.local_devices())
    self.mesh = Mesh(devices.reshape(-1), ("data",))
    self.batch_size = _pad_to(batch_size, devices.size)
    graphdef, params = nnx.split(self.encoder)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    self._params = jax.device_put(params, replicated)
    batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))

    @jax.jit
    def forward(params, ids, mask):
      hidden, _ = nnx.merge(graphdef, params)(ids, mask)
      return masked_mean(hidden, mask)

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
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    ids = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False,
                         return_token_type_ids=False, return_attention_mask=False)["input_ids"]
    return encode_in_batches(self._forward, ids, self.dim, self.batch_size,
                             width=lambda n: _pad_to(n, 8),
                             progress=f"encode (max {max_length} tokens)" if progress else None)


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
