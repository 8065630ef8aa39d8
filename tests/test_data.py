"""Readers, builders, linkage, leakage and the grain pipeline on small generated data."""

import csv
import json

import numpy as np
import pytest

from crossrec_jax.data import ProcessingConfig, SyntheticConfig, builder, metadata, pipeline, synthetic
from crossrec_jax.data.builder import SourceConfig, load_and_process, decode_text
from crossrec_jax.data.movielens import read_movielens
from crossrec_jax.data.processing import link_key
from crossrec_jax.data.records import DataError
from crossrec_jax.models import hf

SMALL = SyntheticConfig(num_users=60, items_per_domain=30, seed=1)


def _byo(tmp_path, fmt):
  """A two-platform directory where platform IDs differ and a mapping file links them."""
  items = [{"item_id": "b1", "domain": "books", "title": "the dark city", "attributes": "mystery"},
           {"item_id": "b2", "domain": "books", "title": "", "attributes": ""},
           {"item_id": "s1", "domain": "shop", "title": "blue ink pen", "attributes": "office"},
           {"item_id": "s2", "domain": "shop", "title": "paper", "attributes": ""}]
  rows = [("alice@books", "books", "b1", 5, 1), ("A-77", "shop", "s1", 1, 2),
          ("alice@books", "books", "b2", 2, 3), ("A-77", "shop", "s2", 1, 4),
          ("bob@books", "books", "b2", 4, 1), ("bob@books", "books", "b1", 3, 2)]
  inter = [dict(zip(("user_id", "domain", "item_id", "label", "timestamp"), r)) for r in rows]
  if fmt == "csv":
    for name, data in (("items", items), ("interactions", inter)):
      with open(tmp_path / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(data[0]))
        w.writeheader()
        w.writerows(data)
  elif fmt == "jsonl":
    for name, data in (("items", items), ("interactions", inter)):
      (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in data) + "\n")
  else:
    import pyarrow as pa, pyarrow.parquet as pq
    for name, data in (("items", items), ("interactions", inter)):
      pq.write_table(pa.Table.from_pylist(data), tmp_path / f"{name}.parquet")
  mapping = tmp_path / "mapping.csv"
  mapping.write_text("domain,user_id,person_id\nbooks,alice@books,person-1\nshop,A-77,person-1\n")
  return tmp_path, mapping


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_byo_reader_and_builder(tmp_path, fmt):
  directory, mapping = _byo(tmp_path, fmt)
  processing = ProcessingConfig(link_secret="s3cret", mapping_file=str(mapping))
  b = builder.prepare("byo", str(directory), data_dir=str(tmp_path / "tfds"), processing=processing)
  src = b.as_data_source()
  md = metadata(b)
  assert [(d["name"], d["task"]) for d in md["domains"]] == [("books", "rating"), ("shop", "implicit")]
  assert len(src["items"]) == 4
  records = [src[s][i] for s in ("train", "valid", "test") if s in src for i in range(len(src[s]))]
  assert len(records) == 6
  # Linkage: both platform IDs of person-1 share one key; raw IDs appear nowhere.
  keys = {decode_text(r["user_key"]) for r in records}
  assert link_key("s3cret", "person-1") in keys and len(keys) == 2
  blob = repr(records)
  for raw in ("alice@books", "A-77", "bob@books"):
    assert raw not in blob
  # An item with no text is still represented (domain + id) in the catalog.
  assert any(decode_text(r["item_text"]) == "" for r in (src["items"][i] for i in range(4)))


def test_raw_ids_only_when_enabled(tmp_path):
  directory, _ = _byo(tmp_path, "csv")
  out = load_and_process(SourceConfig("byo", str(directory),
                                      processing=ProcessingConfig(store_raw_user_ids=True)))
  assert {r["raw_user_id"] for s in out["examples"].values() for r in s} >= {"alice@books"}


def test_same_user_id_links_across_domains(tmp_path):
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL))
  records = [r for s in out["examples"].values() for r in s]
  domains_per_user = {}
  for r in records:
    domains_per_user.setdefault(r["user_key"], set()).add(r["domain"])
  assert len(domains_per_user) == SMALL.num_users
  assert all(len(d) == 3 for d in domains_per_user.values())
  other = load_and_process(SourceConfig("synthetic", synthetic=SMALL,
                                        processing=ProcessingConfig(link_secret="other")))
  assert not set(domains_per_user) & {r["user_key"] for s in other["examples"].values() for r in s}


def _profile_items(profile):
  """'books: the dark city (rated 5) | music: blue jazz' -> [(domain, item text), ...]."""
  items = []
  for line in filter(None, profile.split(" | ")):
    domain, text = line.split(": ", 1)
    items.append((domain, text.rsplit(" (rated", 1)[0]))
  return items


def _check_profiles_use_earlier_train_items(out, texts):
  """Every profile line of every split is one of the user's train interactions strictly before
  the target, newest first; returns the number of lines checked."""
  train = {}
  for r in out["examples"]["train"]:
    train.setdefault(r["user_key"], []).append((r["order"], r["domain"], texts[(r["domain"], r["item_id"])]))
  checked = 0
  for split, records in out["examples"].items():
    for r in records:
      allowed = {(d, t): o for o, d, t in train.get(r["user_key"], []) if o < r["order"]}
      lines = _profile_items(r["profile"])
      for line in lines:
        assert line in allowed, (f"{split} target {r['domain']}/{r['item_id']} of {r['raw_user_id']}: "
                                 f"profile item {line} is not an earlier train interaction")
      orders = [allowed[line] for line in lines]
      assert orders == sorted(orders, reverse=True), f"{split}: profile not newest first"
      checked += len(lines)
  return checked


def test_no_leakage_leave_last_out():
  interactions, items = synthetic.generate(SMALL)
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL,
                                      processing=ProcessingConfig(store_raw_user_ids=True)))
  texts = {(d, i): it.text for (d, i), it in items.items()}
  by_user_domain = {}
  for x in sorted(interactions, key=lambda x: x.order):
    by_user_domain.setdefault((x.user_id, x.domain), []).append(x.item_id)
  # Test targets are each user's last item of the domain, valid targets the one before.
  for split, position in (("test", -1), ("valid", -2)):
    assert out["examples"][split]
    for r in out["examples"][split]:
      history = by_user_domain[(r["raw_user_id"], r["domain"])]
      assert r["item_id"] == history[position], (split, r["raw_user_id"], r["domain"], history)
      # ...and their text never appears in the profile (items are unique per user).
      assert (r["domain"], texts[(r["domain"], r["item_id"])]) not in _profile_items(r["profile"])
  assert {(r["raw_user_id"], r["domain"]) for r in out["examples"]["test"]} == set(by_user_domain)
  assert _check_profiles_use_earlier_train_items(out, texts) > 500


def test_no_leakage_ratio_split_profiles_use_train_only(tmp_path):
  _, items = synthetic.generate(SMALL)
  texts = {(d, i): it.text for (d, i), it in items.items()}
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL, processing=ProcessingConfig(
      split="ratio", ratio=(0.6, 0.2, 0.2), store_raw_user_ids=True)))
  held_out = {(r["user_key"], r["domain"], texts[(r["domain"], r["item_id"])])
              for s in ("valid", "test") for r in out["examples"][s]}
  assert held_out
  # The profile TEXT (rating domains included, whose history_items are empty) holds no valid or
  # test item of the same user.
  for split, records in out["examples"].items():
    for r in records:
      leaked = [(d, t) for d, t in _profile_items(r["profile"]) if (r["user_key"], d, t) in held_out]
      assert not leaked, f"{split} profile of {r['raw_user_id']} contains held-out items {leaked}"
      assert all((r["user_key"], r["domain"], texts[(r["domain"], h)]) not in held_out
                 for h in r["history_items"])
  assert _check_profiles_use_earlier_train_items(out, texts) > 500


def test_prepare_failing_after_records_were_written_leaves_nothing_behind(tmp_path, monkeypatch):
  """The writer fails once a split's array_record files are on disk in tfds's incomplete.*
  directory, midway through the next split: no partial data set and no empty folder stay, an
  earlier data set in the same data_dir is untouched, and the next prepare builds it in full."""
  data_dir = tmp_path / "tfds"
  builder.prepare("synthetic", data_dir=str(data_dir), synthetic_config=SMALL)
  before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
  other = SyntheticConfig(num_users=40, items_per_domain=20, seed=3)
  original = builder.CrossDomain._generate_examples  # pylint: disable=protected-access
  written = []

  def failing(self, records):
    for n, example in enumerate(original(self, records)):
      if n == 5 and not written:
        written.extend(p for p in data_dir.rglob("*.array_record*") if "incomplete" in str(p))
        if written:
          raise OSError("simulated write failure in the middle of a split")
      yield example

  monkeypatch.setattr(builder.CrossDomain, "_generate_examples", failing)
  with pytest.raises(OSError, match="simulated write failure"):
    builder.prepare("synthetic", data_dir=str(data_dir), synthetic_config=other)
  assert written, "the failure came before any record was written"
  assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
  monkeypatch.setattr(builder.CrossDomain, "_generate_examples", original)
  src = builder.prepare("synthetic", data_dir=str(data_dir), synthetic_config=other).as_data_source()
  expected = load_and_process(SourceConfig("synthetic", synthetic=other))
  assert {k: len(src[k]) for k in expected["examples"]} == {
      k: len(v) for k, v in expected["examples"].items()}


def test_cold_users_get_profiles_from_other_domains():
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL))
  cold = [r for r in out["examples"]["test"] if r["cold"]]
  assert cold, "the synthetic generator plants cold users"
  for r in cold:
    assert r["profile"] and f"{r['domain']}:" not in r["profile"]


def test_domain_filter_keeps_only_the_listed_domains():
  full = load_and_process(SourceConfig("synthetic", synthetic=SMALL))
  music = load_and_process(SourceConfig("synthetic", synthetic=SMALL,
                                        processing=ProcessingConfig(domains=("music",))))
  assert [d["name"] for d in music["domains"]] == ["music"]
  assert {r["domain"] for r in music["items"]} == {"music"}
  for split, records in music["examples"].items():
    assert records and all(r["domain"] == "music" for r in records), split
    # Same split of the music interactions as the full data set; profiles lose other domains.
    assert len(records) == sum(r["domain"] == "music" for r in full["examples"][split])
    assert not any("books:" in r["profile"] or "movies:" in r["profile"] for r in records)
  with pytest.raises(DataError, match=r"domain\(s\) \['games'\] not in the data .*fix data.domains"):
    load_and_process(SourceConfig("synthetic", synthetic=SMALL,
                                  processing=ProcessingConfig(domains=("music", "games"))))


def test_movielens_reader(tmp_path):
  (tmp_path / "u.data").write_text("1\t10\t4\t100\n1\t11\t2\t200\n2\t10\t5\t150\n")
  genres = ["0"] * 19
  genres[1] = genres[5] = "1"
  (tmp_path / "u.item").write_bytes(
      ("10|Toy Story (1995)|01-Jan-1995||url|" + "|".join(genres) + "\n"
       "11|Caf\xe9 (1994)|01-Jan-1994||url|" + "|".join(["0"] * 18 + ["1"]) + "\n").encode("latin-1"))
  interactions, items = read_movielens(tmp_path)
  assert len(interactions) == 3 and interactions[0].label == 4.0
  assert items[("movies", "10")].text == "Toy Story (1995). Action, Comedy"
  assert items[("movies", "11")].text == "Café (1994). Western"
  b = builder.prepare("movielens", str(tmp_path), data_dir=str(tmp_path / "tfds"),
                      processing=ProcessingConfig(split="ratio", ratio=(0.5, 0.0, 0.5)))
  assert metadata(b)["domains"][0]["task"] == "rating"
  (tmp_path / "u.data").write_text("1\t10\tfour\t100\n")
  with pytest.raises(Exception, match=r"u\.data:line 1: field rating/timestamp is not numeric"):
    read_movielens(tmp_path)


def test_movielens_demographics_become_user_tags_in_the_interaction_log(tmp_path):
  from crossrec_jax.interactions import InteractionData  # pylint: disable=import-outside-toplevel
  (tmp_path / "u.data").write_text("1\t10\t4\t100\n1\t11\t2\t200\n2\t10\t5\t150\n2\t11\t3\t160\n")
  (tmp_path / "u.item").write_text("10|A (1995)|x||u|" + "|".join(["0"] * 18 + ["1"]) + "\n"
                                   "11|B (1994)|x||u|" + "|".join(["1"] + ["0"] * 18) + "\n")
  (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|04043\n")
  interactions, _ = read_movielens(tmp_path)
  assert interactions[0].user_tags == ("age:18-24", "gender:M", "occupation:technician", "zip:8")
  b = builder.prepare("movielens", str(tmp_path), data_dir=str(tmp_path / "tfds"),
                      processing=ProcessingConfig(split="ratio", ratio=(0.5, 0.0, 0.5)))
  log = InteractionData.from_builder(b)
  assert sorted(map(sorted, log.user_tags)) == [
      ["age:18-24", "gender:M", "occupation:technician", "zip:8"],
      ["age:50-55", "gender:F", "occupation:other", "zip:0"]]
  assert InteractionData.from_builder(b).user_tags == log.user_tags    # the cached copy keeps them
  (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|fifty|F|other|04043\n")
  with pytest.raises(DataError, match=r"u\.user:line 2: expected user\|age\|gender"):
    read_movielens(tmp_path)


def test_synthetic_is_deterministic_and_cross_domain():
  a, _ = synthetic.generate(SMALL)
  b, _ = synthetic.generate(SMALL)
  assert [(x.user_id, x.item_id, x.label) for x in a] == [(x.user_id, x.item_id, x.label) for x in b]
  c, _ = synthetic.generate(SyntheticConfig(num_users=60, items_per_domain=30, seed=2))
  assert [(x.user_id, x.item_id) for x in a] != [(x.user_id, x.item_id) for x in c]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_checkpoint):
  b = builder.prepare("synthetic", data_dir=str(tmp_path_factory.mktemp("tfds")), synthetic_config=SMALL)
  tokenizer = hf.load_tokenizer(tiny_checkpoint)
  cfg = pipeline.PipelineConfig(batch_size=8, user_max_length=48, item_max_length=16,
                                user_buckets=64, item_buckets=32, num_negatives=1)
  src = b.as_data_source()
  domains = [d["name"] for d in metadata(b)["domains"]]
  return src, pipeline.Catalog(src["items"], domains, tokenizer, cfg), tokenizer, cfg


def test_batches_have_fixed_shapes_and_negatives(prepared):
  src, catalog, tokenizer, cfg = prepared
  loader = pipeline.train_loader(src["train"], catalog, tokenizer, cfg, implicit_domains=[2])
  it = iter(loader)
  labels, domains = [], []
  for _ in range(20):
    batch = next(it)
    assert batch["user_input_ids"].shape == (8, 48) and batch["item_input_ids"].shape == (8, 16)
    labels.append(batch["label"])
    domains.append(batch["domain"])
  labels, domains = np.concatenate(labels), np.concatenate(domains)
  assert np.any((domains == 2) & (labels == 0)), "sampled negatives for the implicit domain"
  assert set(np.unique(labels[domains < 2])) <= {1, 2, 3, 4, 5}


def test_iterator_state_restores_exactly(prepared):
  src, catalog, tokenizer, cfg = prepared
  loader = pipeline.train_loader(src["train"], catalog, tokenizer, cfg, implicit_domains=[2])
  it = iter(loader)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = iter(pipeline.train_loader(src["train"], catalog, tokenizer, cfg, implicit_domains=[2]))
  resumed.set_state(state)
  for a, b in zip(expected, (next(resumed) for _ in range(3))):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_eval_batches_pad_the_last_batch(prepared):
  src, catalog, tokenizer, cfg = prepared
  batches = list(pipeline.eval_batches(src["test"], catalog, tokenizer, cfg, batch_size=7))
  total = sum(int(b["weight"].sum()) for b, _ in batches)
  assert total == len(src["test"])
  assert all(b["label"].shape == (7,) for b, _ in batches)
