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


def test_no_leakage_leave_last_out():
  interactions, items = synthetic.generate(SMALL)
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL))
  texts = {(d, i): it.text for (d, i), it in items.items()}
  by_user_order = {}
  for x in interactions:  # raw order of every (user, item) to check "nothing after the target"
    by_user_order.setdefault(x.user_id, []).append(x)
  checked = 0
  for split in ("valid", "test"):
    for r in out["examples"][split]:
      # The target item's own text never appears in its profile (items are unique per user).
      lines = [l.split(": ", 1)[1].rsplit(" (rated", 1)[0] for l in filter(None, r["profile"].split(" | "))]
      assert texts[(r["domain"], r["item_id"])] not in lines
      # The target is the user's last (test) or second-last (valid) item of its domain.
      checked += 1
  assert checked > 0
  # Every profile line is an item the user interacted with strictly before the target.
  for r in out["examples"]["train"][:200]:
    user = next(u for u, xs in by_user_order.items() if link_key("crossrec-default-secret", u) == r["user_key"])
    earlier = {texts[(x.domain, x.item_id)] for x in by_user_order[user] if x.order < r["order"]}
    for line in filter(None, r["profile"].split(" | ")):
      text = line.split(": ", 1)[1].rsplit(" (rated", 1)[0]
      assert text in earlier


def test_no_leakage_ratio_split_profiles_use_train_only(tmp_path):
  out = load_and_process(SourceConfig("synthetic", synthetic=SMALL,
                                      processing=ProcessingConfig(split="ratio", ratio=(0.6, 0.2, 0.2))))
  test_pairs = {(r["user_key"], r["domain"], r["item_id"]) for r in out["examples"]["test"]}
  assert test_pairs
  for split in ("train", "valid", "test"):
    for r in out["examples"][split]:
      assert r["history_items"] == [] or all(
          (r["user_key"], r["domain"], h) not in test_pairs for h in r["history_items"])


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
