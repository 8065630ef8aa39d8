"""Serializing CrossDomain examples without tfds's generic per-feature path.

tfds encodes and serializes every example through generic Python (numpy conversions, shape
checks, nested-dict flattening): ~0.3 ms per example, which was ~85% of a 300k-row prepare.
Our schema is fixed and flat (scalars and 1-D string sequences), so the same ``tf.train.Example``
is built directly from the record. tfds then shuffles, shards and writes the bytes as usual
(split infos, dataset_info.json: unchanged). Safety: ``serializer`` checks its output against
tfds's own on sample records and returns None if they differ (a future tfds encoding change),
and the two tfds hooks below only let ``Serialized`` values through untouched, so any other
example in the process takes tfds's normal path.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from typing import Any, Callable

log = logging.getLogger(__name__)


class Serialized(bytes):
  """An example already serialized as a ``tf.train.Example``."""


_SMALL = [bytes((i,)) for i in range(128)]
_STRING, _STRINGS, _BOOL, _INT, _FLOAT = range(5)


def _varint(n: int) -> bytes:
  if 0 <= n < 0x80:
    return _SMALL[n]
  n &= (1 << 64) - 1  # negative int64: ten-byte two's complement, as protobuf writes it
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _schema(features):
  """[(name, map-entry key bytes, kind)] in tfds's feature order; None for a schema this writer
  does not cover (anything but scalars and 1-D string sequences)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  out = []
  for name, info in features.get_serialized_info().items():
    dtype, shape = np.dtype(info.np_dtype), tuple(info.shape)
    if shape not in ((), (None,)) or getattr(info, "sequence_rank", 0) > 1:
      return None
    if dtype.kind in ("U", "S", "O"):
      kind = _STRING if shape == () else _STRINGS
    elif shape != ():
      return None
    else:
      kind = {"b": _BOOL, "i": _INT, "u": _INT, "f": _FLOAT}.get(dtype.kind)
      if kind is None:
        return None
    key = name.encode()
    out.append((name, b"\x0a" + _varint(len(key)) + key + b"\x12", kind))
  return out


def _make_serialize(schema):
  """The tf.train.Example wire format, written directly: Example.features (1) -> Features.feature
  (1, map<string, Feature>: key 1, value 2); Feature = bytes_list (1) | float_list (2) |
  int64_list (3), each holding its values in field 1 (floats and ints packed).

  Examples are built a batch at a time, column by column: a string's framing depends only on
  its byte length and a scalar's entry only on its value, so both come from caches (a column of
  few distinct strings, such as domains or item IDs, caches whole entries), and each example is
  one ``bytes.join`` of its pieces (no per-example function calls). Columns come straight from a
  ``Records`` batch (``.columns``) or are read out of record dicts."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  varint = _varint
  columns = []
  for name, key, kind in schema:  # key: map-entry key field + the value tag (0x12)
    if kind == _STRING:
      head = _framing(key, lambda n: b"\x0a" + varint(n))
      columns.append((name, kind, _StringColumn(head)))
    elif kind == _STRINGS:
      # Item ids and tags repeat across examples: each value is framed once.
      columns.append((name, kind, (_framing(key, lambda n: b""),
                                   _Cache(lambda text: b"\x0a" + _len(text.encode())))))
    elif kind == _FLOAT:  # entry: key, len 8, Feature(float_list(len 6: tag, len 4, 4 bytes))
      columns.append((name, kind, b"\x0a" + varint(len(key) + 9) + key + b"\x08\x12\x06\x0a\x04"))
    else:  # bool and int: the whole entry is a function of the value
      to_int = (lambda v: int(bool(v))) if kind == _BOOL else int
      entry = lambda v, key=key, to_int=to_int: _entry(
          key, b"\x1a" + _len(b"\x0a" + _len(varint(to_int(v)))))
      columns.append((name, kind, _Cache(entry)))

  example_head = _Cache(lambda n: b"\x0a" + varint(n))

  def batch(records, defaults=None) -> list[Serialized]:
    defaults = defaults or {}
    n = len(records)
    given = getattr(records, "columns", None)  # processing.Records: already by column
    pieces, lengths = [], np.zeros(n, np.int64)
    for name, kind, how in columns:
      if given is None:
        values = _column(records, name, defaults.get(name))
      elif name in given:
        values = given[name]
      else:  # a column the split lacks (e.g. history rows' profile): the default throughout
        values = [defaults.get(name)] * n
      if kind == _STRING:
        entries = how(values, pieces)
        lengths += entries
      elif kind == _STRINGS:  # BytesList with one field per value
        framing, framed = how
        if not any(values):  # all empty (e.g. no tags): one entry for every example
          entry = framing[0]
          pieces.append([entry] * n)
          lengths += len(entry)
          continue
        data = [b"".join(map(framed.__getitem__, v)) if v else b"" for v in values]
        sizes = list(map(len, data))
        heads = framing.many(sizes)
        pieces += (heads, data)
        lengths += np.asarray(sizes, np.int64) + np.fromiter(map(len, heads), np.int64, n)
      elif kind == _FLOAT:
        size = len(how) + 4
        raw = np.empty((n, size), np.uint8)
        raw[:, :len(how)] = np.frombuffer(how, np.uint8)
        raw[:, len(how):] = np.asarray(values, np.float64).astype("<f4").view(np.uint8).reshape(n, 4)
        raw = raw.tobytes()
        pieces.append([raw[i:i + size] for i in range(0, n * size, size)])
        lengths += size
      else:
        entries = how.many(values)
        pieces.append(entries)
        lengths += np.fromiter(map(len, entries), np.int64, n)
    heads = example_head.many(lengths.tolist())
    return list(map(Serialized, map(b"".join, zip(heads, *pieces))))

  def serialize(record) -> Serialized:
    return batch([record])[0]
  serialize.batch = batch
  return serialize


class _StringColumn:
  """A bytes_list feature of one string per example. While the column's values repeat (domains,
  item IDs, item texts) each distinct value's whole entry is cached; a column whose values are
  nearly all distinct (profiles) is framed by length only, without keeping its values."""

  def __init__(self, head):
    self.head, self.entries, self.seen, self.cached = head, {}, 0, True

  def __call__(self, values: list, pieces: list):
    """Appends the pieces of ``values``' entries to ``pieces``; returns their sizes."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    n = len(values)
    if self.cached:
      entries, head = self.entries, self.head
      for v in set(values).difference(entries):
        data = v.encode()
        entries[v] = head[len(data)] + data
      self.seen += n
      if len(entries) <= max(0.9 * self.seen, 1024):
        out = list(map(entries.__getitem__, values))
        pieces.append(out)
        return np.fromiter(map(len, out), np.int64, n)
      self.cached, self.entries = False, {}  # mostly distinct: stop caching
    data = list(map(str.encode, values))
    sizes = list(map(len, data))
    heads = self.head.many(sizes)
    pieces += (heads, data)
    return np.asarray(sizes, np.int64) + np.fromiter(map(len, heads), np.int64, n)


def _column(records, name: str, default) -> list:
  """``name`` of every record; ``default`` where a record lacks it (e.g. history rows)."""
  try:
    return list(map(operator.itemgetter(name), records))  # the common case, at C speed
  except KeyError:
    return [r[name] if name in r else default for r in records]


def _len(b: bytes) -> bytes:
  """A length-delimited field's length and payload."""
  return _varint(len(b)) + b


def _entry(key: bytes, feature: bytes) -> bytes:
  """A Features.feature map entry: the key (``key`` ends with the value's tag) and the Feature."""
  body = key + _len(feature)
  return b"\x0a" + _len(body)


def _framing(key: bytes, inner_head):
  """Everything before a payload of n bytes in a bytes_list entry; ``inner_head(n)`` frames a
  single value (a string) or nothing (a list, whose values are framed already)."""
  def head(n):
    inner = inner_head(n)
    feature_head = b"\x0a" + _varint(len(inner) + n)  # bytes_list
    feature_size = len(feature_head) + len(inner) + n
    body = len(key) + len(_varint(feature_size)) + feature_size
    return b"\x0a" + _varint(body) + key + _varint(feature_size) + feature_head + inner
  return _Cache(head)


class _Cache(dict):
  """value -> bytes, computed once per distinct value."""

  def __init__(self, make):
    super().__init__()
    self.make = make

  def __missing__(self, value):
    self[value] = out = self.make(value)
    return out

  def many(self, values: list) -> list[bytes]:
    return list(map(self.__getitem__, values))


def serializer(features, samples) -> Callable[[dict[str, Any]], Serialized] | None:
  """A fast record -> bytes function for ``features``, or None where it would not give what
  tfds gives on ``samples`` (records already completed with every feature)."""
  if not _active[0]:
    return None  # outside pass_serialized_through, tfds would not let the bytes through
  try:
    from tensorflow_datasets.core import example_serializer  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
    schema = _schema(features)
    if schema is None:
      return None
    serialize = _make_serialize(schema)
    reference = example_serializer.ExampleSerializer(features.get_serialized_info())
    for record in samples:
      ours = tf_example_pb2.Example.FromString(serialize(record))
      theirs = tf_example_pb2.Example.FromString(
          reference.serialize_example(features.encode_example(record)))
      if ours != theirs:
        log.warning("fast example serialization differs from tfds's; using tfds's (slower)")
        return None
    return serialize
  except Exception as e:  # pylint: disable=broad-except
    log.warning("fast example serialization unavailable (%s); using tfds's (slower)", e)
    return None


_active = [0]  # >0 while the tfds hooks below are in place


@contextlib.contextmanager
def pass_serialized_through():
  """Lets ``Serialized`` examples through tfds's encode and serialize steps unchanged. Where
  tfds has no such hooks (another version), nothing is patched and ``serializer`` returns None."""
  try:
    from tensorflow_datasets.core import example_serializer  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.core.features import features_dict  # pylint: disable=import-outside-toplevel
    encode = features_dict.FeaturesDict.encode_example
    serialize = example_serializer.ExampleSerializer.serialize_example
  except (ImportError, AttributeError) as e:
    log.warning("fast example serialization unavailable (%s); using tfds's (slower)", e)
    yield
    return

  def encode_example(self, example_dict):
    return example_dict if isinstance(example_dict, Serialized) else encode(self, example_dict)

  def serialize_example(self, example):
    return example if isinstance(example, Serialized) else serialize(self, example)  # no copy

  features_dict.FeaturesDict.encode_example = encode_example
  example_serializer.ExampleSerializer.serialize_example = serialize_example
  _active[0] += 1
  try:
    yield
  finally:
    _active[0] -= 1
    features_dict.FeaturesDict.encode_example = encode
    example_serializer.ExampleSerializer.serialize_example = serialize


# group_size 1: training reads single records at random (grain), so each record stays its own
# chunk. snappy instead of array_record's default zstd: ~2.5x less CPU per ~1 KB record and
# faster reads, for ~20% more disk. The compression is in each file's header: readers take
# files of either kind, including data sets prepared before this choice.
ARRAY_RECORD_OPTIONS = "group_size:1,snappy"


@contextlib.contextmanager
def array_record_options(options: str | None = None):
  """tfds writes its array_record shards with ``options`` (default ``ARRAY_RECORD_OPTIONS``;
  tfds's own writer fixes 'group_size:1', i.e. zstd)."""
  options = options or ARRAY_RECORD_OPTIONS
  try:
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel
    adapter = file_adapters.ArrayRecordFileAdapter
    original = adapter.__dict__["write_examples"]
  except (ImportError, AttributeError, KeyError) as e:
    log.warning("array_record options unavailable (%s); tfds's defaults are used", e)
    yield
    return

  def write_examples(cls, path, iterator):
    del cls
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), options)
    try:
      for _, serialized in iterator:
        writer.write(serialized)
    finally:
      writer.close()

  adapter.write_examples = classmethod(write_examples)
  try:
    yield
  finally:
    adapter.write_examples = original
