"""Malformed bring-your-own inputs: each error names the file, the row and the field."""

import json

import pytest

from crossrec_jax.data import DataError, builder
from crossrec_jax.data.builder import SourceConfig, load_and_process
from crossrec_jax.data.processing import ProcessingConfig

ITEMS = "item_id,domain,title\nb1,books,the dark city\nb2,books,blue night\nm1,music,jazz album\n"
INTERACTIONS = ("user_id,domain,item_id,label,timestamp\n"
                "u1,books,b1,4,1\nu1,music,m1,1,2\nu1,books,b2,5,3\n"
                "u2,books,b2,3,1\nu2,music,m1,1,2\n")


def _write(tmp_path, items=ITEMS, interactions=INTERACTIONS, ext="csv"):
  (tmp_path / f"items.{ext}").write_text(items, encoding="utf-8")
  (tmp_path / f"interactions.{ext}").write_text(interactions, encoding="utf-8")
  return tmp_path


def _process(path, **processing):
  return load_and_process(SourceConfig("byo", str(path),
                                       processing=ProcessingConfig(**processing)))


def test_valid_directory_processes(tmp_path):
  out = _process(_write(tmp_path))
  assert [d["name"] for d in out["domains"]] == ["books", "music"]
  assert {d["name"]: d["task"] for d in out["domains"]} == {"books": "rating", "music": "implicit"}


# (case id, items text, interactions text, regex the message must match)
CASES = [
    ("missing_column", ITEMS, "user_id,domain,item_id\nu1,books,b1\n",
     r"interactions\.csv: missing column\(s\) \['label'\]"),
    ("items_missing_domain_column", "item_id,title\nb1,x\n", INTERACTIONS,
     r"items\.csv: missing column\(s\) \['domain'\]"),
    ("empty_user_id", ITEMS, "user_id,domain,item_id,label\n,books,b1,4\n",
     r"interactions\.csv:line 2: field user_id is empty"),
    ("empty_item_id", ITEMS, "user_id,domain,item_id,label\nu1,books,,4\n",
     r"interactions\.csv:line 2: field item_id is empty"),
    ("empty_item_row_id", "item_id,domain,title\n,books,x\n", INTERACTIONS,
     r"items\.csv:line 2: field item_id is empty"),
    ("non_numeric_label", ITEMS, "user_id,domain,item_id,label\nu1,books,b1,4\nu1,books,b2,five\n",
     r"interactions\.csv:line 3: field label 'five' is not a finite number"),
    ("nan_label", ITEMS, "user_id,domain,item_id,label\nu1,books,b1,nan\n",
     r"interactions\.csv:line 2: field label 'nan' is not a finite number"),
    ("unknown_domain", ITEMS, "user_id,domain,item_id,label\nu1,books,b1,4\nu1,games,g1,3\n",
     r"interactions\.csv:line 3: field domain 'games' is not a domain of .*items\.csv"),
    ("unknown_item", ITEMS, "user_id,domain,item_id,label\nu1,books,b1,4\nu1,books,b9,3\n",
     r"interactions\.csv:line 3: field item_id 'b9' of domain 'books' is missing from .*items\.csv"),
    ("conflicting_item_text", ITEMS + "b1,books,another title\n", INTERACTIONS,
     r"items\.csv:line 5: item 'b1' of domain 'books' appears again with different text"),
    ("bad_timestamp", ITEMS, "user_id,domain,item_id,label,timestamp\nu1,books,b1,4,yesterday\n",
     r"interactions\.csv:line 2: field timestamp 'yesterday' is not a finite number"),
    ("bad_split", ITEMS, "user_id,domain,item_id,label,split\nu1,books,b1,4,holdout\n",
     r"interactions\.csv:line 2: field split 'holdout' is not one of"),
    ("too_many_fields", ITEMS, "user_id,domain,item_id,label\nu1,books,b1,4,extra\n",
     r"interactions\.csv:line 2: more fields than the header's 4"),
    ("empty_interactions_file", ITEMS, "", r"interactions\.csv: file is empty"),
    ("header_only", ITEMS, "user_id,domain,item_id,label\n", r"interactions\.csv: no valid interaction rows"),
    ("partial_split_column", ITEMS, "user_id,domain,item_id,label,split\nu1,books,b1,4,train\nu1,books,b2,5,\n",
     r"interactions\.csv:line 3: field split is empty while other rows have one"),
]


@pytest.mark.parametrize("items,interactions,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_csv(tmp_path, items, interactions, pattern):
  with pytest.raises(DataError, match=pattern):
    _process(_write(tmp_path, items, interactions))


def test_label_out_of_scale(tmp_path):
  path = _write(tmp_path, interactions="user_id,domain,item_id,label\nu1,books,b1,4\nu1,books,b2,7\n")
  with pytest.raises(DataError, match=r"interactions\.csv:line 3: field label 7 is outside domain 'books'.s rating scale \[1, 5\]"):
    _process(path, rating_scales=(("books", 1.0, 5.0),))


def test_invalid_utf8(tmp_path):
  _write(tmp_path)
  (tmp_path / "items.csv").write_bytes(b"item_id,domain,title\nb1,books,caf\xe9\n")
  with pytest.raises(DataError, match=r"items\.csv:line 2: not valid UTF-8.*re-encode"):
    _process(tmp_path)


def test_invalid_jsonl_line(tmp_path):
  rows = [{"user_id": "u1", "domain": "books", "item_id": "b1", "label": 4}]
  text = json.dumps(rows[0]) + "\n{not json\n"
  _write(tmp_path, interactions=text, ext="jsonl")
  (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(r) for r in [
      {"item_id": "b1", "domain": "books", "title": "x"}]))
  (tmp_path / "items.csv").unlink(missing_ok=True)
  with pytest.raises(DataError, match=r"interactions\.jsonl:line 2: invalid JSON"):
    _process(tmp_path)


def test_corrupt_parquet(tmp_path):
  _write(tmp_path)
  (tmp_path / "interactions.csv").unlink()
  (tmp_path / "interactions.parquet").write_bytes(b"PAR1 definitely not parquet")
  with pytest.raises(DataError, match=r"interactions\.parquet: not a readable Parquet file"):
    _process(tmp_path)


def test_missing_files(tmp_path):
  with pytest.raises(DataError, match=r"no items\.csv, items\.jsonl or items\.parquet found"):
    _process(tmp_path)
  with pytest.raises(DataError, match=r"nope: data directory does not exist"):
    builder.prepare("byo", str(tmp_path / "nope"), data_dir=str(tmp_path / "tfds"))


def test_two_formats_at_once(tmp_path):
  _write(tmp_path)
  (tmp_path / "items.jsonl").write_text('{"item_id": "b1", "domain": "books"}\n')
  with pytest.raises(DataError, match=r"several items files \(items\.csv, items\.jsonl\)"):
    _process(tmp_path)


def test_skip_policy_counts_bad_rows(tmp_path):
  path = _write(tmp_path, interactions=INTERACTIONS + ",books,b1,4,4\nu3,books,b1,x,5\nu3,games,g1,1,6\n")
  out = load_and_process(SourceConfig("byo", str(path), bad_rows="skip"))
  assert out["report"]["skipped_rows"] == 3
  assert out["report"]["by_reason"] == {"empty_id": 1, "bad_label": 1, "unknown_domain": 1}
  assert any("line 7" in e for e in out["report"]["examples"])


def test_failed_prepare_leaves_no_half_dataset(tmp_path):
  data_dir = tmp_path / "tfds"
  (tmp_path / "src").mkdir()
  good = _write(tmp_path / "src")
  builder.prepare("byo", str(good), data_dir=str(data_dir))
  datasets = data_dir / "cross_domain"
  before = sorted(p.relative_to(datasets) for p in datasets.rglob("*"))
  # Break the source: the fingerprint changes, the new prepare fails mid-way...
  (good / "interactions.csv").write_text(INTERACTIONS + "u9,books,b1,bad,9\n")
  with pytest.raises(DataError, match=r"line 7: field label 'bad'"):
    builder.prepare("byo", str(good), data_dir=str(data_dir))
  after = sorted(p.relative_to(datasets) for p in datasets.rglob("*"))
  # ...and neither a partial data set nor an 'incomplete' directory is left; the old one is intact.
  assert after == before
  assert not any("incomplete" in str(p) for p in after)


def test_fast_serialization_reads_back_like_tfds_own(tmp_path, monkeypatch):
  """The data set written through fast_write holds exactly what tfds's generic path writes."""
  from crossrec_jax.data import fast_write  # pylint: disable=import-outside-toplevel
  items = ITEMS.replace("jazz album", '"jazz\nalbum \u2028 caf\u00e9"')
  (tmp_path / "src").mkdir()
  path = _write(tmp_path / "src", items=items)
  calls = []
  original = fast_write.serializer
  def spy(*args):
    calls.append(original(*args))
    return calls[-1]
  monkeypatch.setattr(fast_write, "serializer", spy)
  processing = ProcessingConfig(link_secret="s")
  fast = builder.prepare("byo", str(path), data_dir=str(tmp_path / "fast"), processing=processing)
  assert calls and calls[0] is not None  # the fast path was taken
  monkeypatch.setattr(fast_write, "serializer", lambda *a: None)  # tfds's own path
  slow = builder.prepare("byo", str(path), data_dir=str(tmp_path / "slow"), processing=processing)
  a, b = fast.as_data_source(), slow.as_data_source()
  assert sorted(a) == sorted(b)
  for split in a:
    assert len(a[split]) == len(b[split]) > 0
    for i in range(len(a[split])):
      x, y = a[split][i], b[split][i]
      assert x.keys() == y.keys()
      for k in x:
        assert repr(x[k]) == repr(y[k]), (split, i, k)


def test_fast_serialization_matches_tfds_on_edge_lengths():
  """Varint boundaries (127/128 bytes), long texts, unicode, empty and long lists, big ints."""
  import random  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import example_serializer  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data import fast_write  # pylint: disable=import-outside-toplevel
  features = builder.CrossDomain(config=builder.CrossDomainBuilderConfig(name="x"),
                                 data_dir="/nonexistent").info.features
  rng = random.Random(0)
  text = lambda n: "".join(rng.choice("ab \u2028\u00e9\u5b57") for _ in range(n))
  records = [builder._EXAMPLE_DEFAULTS | {
      "user_key": text(rng.randrange(300)), "item_text": text(rng.choice([0, 42, 127, 128, 20000])),
      "profile": text(rng.randrange(3000)), "domain_index": rng.choice([0, 127, 128, 2**31 - 1]),
      "history_items": [text(rng.randrange(200)) for _ in range(rng.randrange(40))],
      "cold": rng.random() < 0.5, "label": rng.random() * 5, "order": rng.random() * 1e9}
      for _ in range(200)]
  with fast_write.pass_serialized_through():
    serialize = fast_write.serializer(features, records[:2])
  assert serialize is not None
  reference = example_serializer.ExampleSerializer(features.get_serialized_info())
  for record in records:
    assert tf_example_pb2.Example.FromString(serialize(record)) == tf_example_pb2.Example.FromString(
        reference.serialize_example(features.encode_example(record)))


def test_array_record_compression_reads_back_like_tfds_default(tmp_path, monkeypatch):
  """Shards are written with fast_write's options (snappy), and read back exactly as a data set
  written with tfds's own options (zstd), so data sets prepared before the change still read."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data import fast_write  # pylint: disable=import-outside-toplevel
  (tmp_path / "src").mkdir()
  path = _write(tmp_path / "src")
  processing = ProcessingConfig(link_secret="s")
  ours = builder.prepare("byo", str(path), data_dir=str(tmp_path / "ours"), processing=processing)
  monkeypatch.setattr(fast_write, "ARRAY_RECORD_OPTIONS", "group_size:1")  # tfds's choice
  default = builder.prepare("byo", str(path), data_dir=str(tmp_path / "default"),
                            processing=processing)
  for directory, expected in ((tmp_path / "ours", "snappy"), (tmp_path / "default", "zstd")):
    shards = sorted(directory.rglob("*.array_record-*"))
    assert shards
    for shard in shards:
      options = array_record_module.ArrayRecordReader(str(shard)).writer_options_string()
      assert "group_size:1," in options and expected in options, (shard, options)
  a, b = ours.as_data_source(), default.as_data_source()
  assert sorted(a) == sorted(b)
  for split in a:
    assert len(a[split]) == len(b[split]) > 0
    assert [repr(a[split][i]) for i in range(len(a[split]))] == [
        repr(b[split][i]) for i in range(len(b[split]))]
