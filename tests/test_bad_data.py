"""Malformed bring-your-own data sets through ``prepare``: each is refused with a message that
names the file, the line (or Parquet row) and the field, and leaves nothing behind (the source
directory and the tfds data dir are compared before and after). Then what must be accepted
(text with U+2028 / quoted newlines / 1 MB fields), the skip policy, duplicates, the lock."""

import json
import logging
import pathlib
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrec_jax.config_defaults import base_config
from crossrec_jax.data import DataError, builder, labels
from crossrec_jax.data.builder import SourceConfig, load_and_process
from crossrec_jax.data.processing import ProcessingConfig

SECRET = ProcessingConfig(link_secret="test-secret")  # an explicit secret: no secret file written
ITEMS = "item_id,domain,title\n" + "".join(f"b{i},books,book {i}\n" for i in range(12)) + \
        "m1,music,jazz\nm2,music,rock\n"
HEADER = "user_id,domain,item_id,label,timestamp\n"
# Enough books ratings (1-5) for outlier detection, a music domain of clicks.
GOOD = "".join(f"u{i % 4},books,b{i},{1 + i % 5},{i}\n" for i in range(12)) + \
       "u0,music,m1,1,20\nu0,music,m2,0,21\nu1,music,m1,1,22\nu1,music,m2,1,23\n"
EVAL = (("valid", "data.eval_split"), ("test", "data.test_split"))


def _row(n):  # physical line of GOOD's row n (1-based after the header)
  return n + 1


def _parquet(rows, schema=None):
  sink = pa.BufferOutputStream()
  pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
  return sink.getvalue().to_pybytes()


def _jsonl(rows):
  return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


INTER_JSON = [{"user_id": f"u{i % 4}", "domain": "books", "item_id": f"b{i}", "label": 1 + i % 5,
               "position": i} for i in range(12)]

# (id, {file name: content}, prepare kwargs, regex the message must match)
CASES = [
    # Labels and scales.
    ("label_outlier_50", {"interactions.csv": HEADER + GOOD + "u3,books,b1,50,30\n"}, {},
     r"interactions\.csv:line 18: field label 50 is far above domain 'books'.s other labels .*"
     r"data\.rating_scales"),
    ("label_underscore_1_000", {"interactions.csv": HEADER + GOOD + "u3,books,b1,1_000,30\n"}, {},
     r"interactions\.csv:line 18: field label '1_000' is not a finite number"),
    ("label_negative", {"interactions.csv": HEADER + GOOD + "u3,books,b1,-3,30\n"}, {},
     r"interactions\.csv:line 18: field label -3 is negative.*data\.rating_scales"),
    ("label_true_csv", {"interactions.csv": HEADER + GOOD + "u3,books,b1,true,30\n"}, {},
     r"interactions\.csv:line 18: field label 'true' is not a finite number"),
    ("label_empty", {"interactions.csv": HEADER + "u3,books,b1,,30\n" + GOOD}, {},
     r"interactions\.csv:line 2: field label is empty"),
    ("label_nan", {"interactions.csv": HEADER + GOOD + "u3,books,b1,nan,30\n"}, {},
     r"interactions\.csv:line 18: field label 'nan' is not a finite number"),
    ("label_inf", {"interactions.csv": HEADER + "u3,books,b1,inf,30\n" + GOOD}, {},
     r"interactions\.csv:line 2: field label 'inf' is not a finite number"),
    ("label_hex", {"interactions.csv": HEADER + "u3,books,b1,0x4,30\n" + GOOD}, {},
     r"interactions\.csv:line 2: field label '0x4' is not a finite number"),
    ("label_outside_declared_scale", {"interactions.csv": HEADER + GOOD + "u3,books,b1,6,30\n"},
     {"processing": ProcessingConfig(link_secret="s", rating_scales=(("books", 1.0, 5.0),))},
     r"interactions\.csv:line 18: field label 6 is outside domain 'books'.s rating scale \[1, 5\]"),
    ("label_not_01_in_declared_implicit", {"interactions.csv": HEADER + GOOD + "u3,music,m1,3,30\n"},
     {"processing": ProcessingConfig(link_secret="s", domain_tasks=(("music", "implicit"),))},
     r"interactions\.csv:line 18: field label 3 is not 0 or 1, but domain 'music' is declared "
     r"implicit \(data\.domain_tasks\)"),
    ("mixed_implicit_explicit", {"interactions.csv": HEADER + GOOD + "u3,books,b1,0,30\n"}, {},
     r"interactions\.csv: domain 'books' mixes 0/1 labels .*line 18: label 0.*"
     r"data\.domain_tasks='books=rating'"),
    ("all_ratings_equal", {"interactions.csv": HEADER + "u1,books,b1,4,1\nu1,books,b2,4,2\n"
                           "u1,books,b3,4,3\n"}, {},
     r"interactions\.csv: all ratings of domain 'books' equal 4.*data\.rating_scales='books=1:5'"),
    # IDs and positions.
    ("user_id_whitespace_only", {"interactions.csv": HEADER + GOOD + "   ,books,b1,4,30\n"}, {},
     r"interactions\.csv:line 18: field user_id is empty \(or whitespace only\)"),
    ("item_id_nul", {"interactions.csv": HEADER + GOOD + "u3,books,b\x001,4,30\n"}, {},
     r"interactions\.csv:line 18: field item_id contains a NUL character"),
    ("domain_empty", {"interactions.csv": HEADER + "u3,,b1,4,30\n" + GOOD}, {},
     r"interactions\.csv:line 2: field domain is empty"),
    ("timestamp_nan", {"interactions.csv": HEADER + GOOD + "u3,books,b1,4,NaN\n"}, {},
     r"interactions\.csv:line 18: field timestamp 'NaN' is not a finite number"),
    ("timestamp_text", {"interactions.csv": HEADER + GOOD + "u3,books,b1,4,yesterday\n"}, {},
     r"interactions\.csv:line 18: field timestamp 'yesterday' is not a finite number"),
    ("position_inf", {"interactions.csv": HEADER.replace("timestamp", "position") + GOOD
                      + "u3,books,b1,4,inf\n"}, {},
     r"interactions\.csv:line 18: field position 'inf' is not a finite number"),
    ("line_after_quoted_newline", {"interactions.csv": HEADER + 'u1,books,"b\n1",4,1\n'
                                   + "u1,books,b2,x,2\n"}, {},
     r"interactions\.csv:line 4: field label 'x'"),
    # Row structure.
    ("too_many_fields", {"interactions.csv": HEADER + GOOD + "u3,books,b1,4,30,extra\n"}, {},
     r"interactions\.csv:line 18: more fields than the header's 5"),
    ("too_few_fields", {"interactions.csv": HEADER + "u3,books,b1,4\n" + GOOD}, {},
     r"interactions\.csv:line 2: fewer fields than the header's 5"),
    ("unclosed_quote", {"interactions.csv": HEADER + GOOD + 'u3,books,"b1,4,30\n'}, {},
     r"interactions\.csv:line 18: a quoted field is never closed"),
    ("repeated_header_name", {"interactions.csv": "user_id,domain,item_id,label,label\n" + GOOD}, {},
     r"interactions\.csv:line 1: the header .* repeated column name"),
    ("invalid_utf8", {"interactions.csv": (HEADER + "u1,books,b1,4,1\n").encode() + b"u\xff,books,b2,4,2\n"},
     {}, r"interactions\.csv:line 3: not valid UTF-8"),
    # Splits.
    ("bad_split_value", {"interactions.csv": HEADER.replace("\n", ",split\n")
                         + "u1,books,b1,4,1,holdout\n"}, {},
     r"interactions\.csv:line 2: field split 'holdout' is not one of"),
    ("partial_split_column", {"interactions.csv": HEADER.replace("\n", ",split\n")
                              + "u1,books,b1,4,1,train\nu1,books,b2,5,2,\n"}, {},
     r"interactions\.csv:line 3: field split is empty while other rows have one"),
    ("no_train_rows", {"interactions.csv": HEADER + "".join(
        f"u{i},books,b{i},{1 + i % 5},{i}\n" for i in range(10))}, {},
     r"interactions\.csv: no train rows: leave-last-out .* at most 1 interaction\(s\) per user "
     r"and domain\. Use data\.split='ratio'"),
    ("no_eval_rows", {"interactions.csv": HEADER.replace("\n", ",split\n") + "".join(
        f"u{i % 3},books,b{i},{1 + i % 5},{i},train\n" for i in range(10))},
     {"require_any_of": EVAL},
     r"no valid or test rows, so evaluation \(data\.eval_split='valid', "
     r"data\.test_split='test'\) has nothing to evaluate"),
    # Against the item table, and the table layout.
    ("unknown_domain", {"interactions.csv": HEADER + GOOD + "u3,games,g1,4,30\n"}, {},
     r"interactions\.csv:line 18: field domain 'games' is not a domain of .*items\.csv"),
    ("unknown_item", {"interactions.csv": HEADER + GOOD + "u3,books,b99,4,30\n"}, {},
     r"interactions\.csv:line 18: field item_id 'b99' of domain 'books' is missing from .*items\.csv"),
    ("missing_label_column", {"interactions.csv": "user_id,domain,item_id\nu1,books,b1\n"}, {},
     r"interactions\.csv: missing column\(s\) \['label'\]"),
    ("empty_file", {"interactions.csv": ""}, {}, r"interactions\.csv: file is empty"),
    ("blank_file", {"interactions.csv": "\n\n  \n"}, {}, r"interactions\.csv: file is empty"),
    ("header_only", {"interactions.csv": HEADER}, {}, r"interactions\.csv: no valid interaction rows"),
    ("two_formats", {"interactions.jsonl": _jsonl(INTER_JSON)}, {},
     r"several interactions files \(interactions\.csv, interactions\.jsonl\)"),
    # Items.
    ("items_nul_id", {"items.csv": ITEMS + "b\x009,books,x\n"}, {},
     r"items\.csv:line 16: field item_id contains a NUL character"),
    ("items_whitespace_domain", {"items.csv": ITEMS + "b9,  ,x\n"}, {},
     r"items\.csv:line 16: field domain is empty \(or whitespace only\)"),
    ("items_conflicting_text", {"items.csv": ITEMS + "b1,books,another title\n"}, {},
     r"items\.csv:line 16: item 'b1' of domain 'books' appears again with different text"),
    ("items_missing_column", {"items.csv": "item_id,title\nb1,x\n"}, {},
     r"items\.csv: missing column\(s\) \['domain'\]"),
    # JSONL: booleans, objects, lists are not values.
    ("jsonl_label_true", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + [{"user_id": "u3", "domain": "books", "item_id": "b1", "label": True,
                       "position": 30}])}, {},
     r"interactions\.jsonl:line 13: field label true is a boolean"),
    ("jsonl_user_id_object", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        [{"user_id": {"id": 1}, "domain": "books", "item_id": "b1", "label": 4}] + INTER_JSON)}, {},
     r"interactions\.jsonl:line 1: field user_id holds an object"),
    ("jsonl_item_id_list", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + [{"user_id": "u3", "domain": "books", "item_id": ["b1"], "label": 4}])}, {},
     r"interactions\.jsonl:line 13: field item_id holds a list"),
    ("jsonl_invalid_line", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + ["{not json"])}, {}, r"interactions\.jsonl:line 13: invalid JSON"),
    ("jsonl_array_line", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + ["[1, 2]"])}, {}, r"interactions\.jsonl:line 13: a JSON object per line"),
    ("jsonl_position_nan", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + ['{"user_id": "u3", "domain": "books", "item_id": "b1", "label": 4, '
                      '"position": NaN}'])}, {},
     r"interactions\.jsonl:line 13: field position 'nan' is not a finite number"),
    ("jsonl_label_string", {"interactions.csv": None, "interactions.jsonl": _jsonl(
        INTER_JSON + [{"user_id": "u3", "domain": "books", "item_id": "b1", "label": "five"}])}, {},
     r"interactions\.jsonl:line 13: field label 'five' is not a finite number"),
    ("jsonl_items_domain_list", {"items.csv": None, "items.jsonl": _jsonl(
        [{"item_id": "b1", "domain": ["books"]}])}, {},
     r"items\.jsonl:line 1: field domain holds a list"),
    # Parquet.
    ("parquet_label_bool", {"interactions.csv": None, "interactions.parquet": _parquet(
        [{"user_id": "u1", "domain": "books", "item_id": "b1", "label": True}])}, {},
     r"interactions\.parquet:row 0: field label true is a boolean"),
    ("parquet_user_id_list", {"interactions.csv": None, "interactions.parquet": _parquet(
        [{"user_id": ["u1"], "domain": "books", "item_id": "b1", "label": 4.0}])}, {},
     r"interactions\.parquet:row 0: field user_id holds a list"),
    ("parquet_position_nan", {"interactions.csv": None, "interactions.parquet": _parquet(
        [{"user_id": "u1", "domain": "books", "item_id": "b1", "label": 4.0, "position": 1.0},
         {"user_id": "u1", "domain": "books", "item_id": "b2", "label": 4.0,
          "position": float("nan")}])}, {},
     r"interactions\.parquet:row 1: field position 'nan' is not a finite number"),
    ("parquet_corrupt", {"interactions.csv": None, "interactions.parquet": b"PAR1 not parquet"}, {},
     r"interactions\.parquet: not a readable Parquet file"),
]


def _tree(root: pathlib.Path):
  return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1)
                for p in root.rglob("*"))


def _source(tmp_path, files):
  src = tmp_path / "src"
  src.mkdir()
  contents = {"items.csv": ITEMS, "interactions.csv": HEADER + GOOD} | files
  for name, content in contents.items():
    if content is None:
      continue
    (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
  return src


@pytest.mark.parametrize("files,kwargs,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_data_is_refused_and_leaves_nothing(tmp_path, files, kwargs, pattern):
  src = _source(tmp_path, files)
  before = _tree(tmp_path)
  kwargs = {"processing": SECRET} | kwargs
  with pytest.raises(DataError, match=pattern):
    builder.prepare("byo", str(src), data_dir=str(tmp_path / "tfds"), **kwargs)
  assert _tree(tmp_path) == before  # no tfds dir, no cross_domain/, downloads/, incomplete.*


def test_at_least_45_cases():
  assert len(CASES) >= 45


def _process(src, **kwargs):
  return load_and_process(SourceConfig("byo", str(src), processing=SECRET, **kwargs))


def test_text_separators_and_quoted_newlines_are_data(tmp_path):
  title = "first line\nsecond\u2028line\u0085with\x0cform feed"
  items = 'item_id,domain,title\nb1,books,"' + title + '"\nb2,books,plain\n'
  src = _source(tmp_path, {"items.csv": items, "interactions.csv": HEADER +
                           "u1,books,b1,4,1\nu1,books,b2,5,2\nu1,books,b1,3,3\n"})
  out = _process(src)
  texts = {r["item_id"]: r["item_text"] for r in out["items"]}
  assert texts == {"b1": title, "b2": "plain"}  # no bogus item, nothing cut or glued


def test_jsonl_with_u2028_is_accepted(tmp_path):
  rows = [{"item_id": "b1", "domain": "books", "title": "a\u2028b"},
          {"item_id": "b2", "domain": "books", "title": "c"}]
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
  assert "\u2028" in text
  src = _source(tmp_path, {"items.csv": None, "items.jsonl": text, "interactions.csv": HEADER +
                           "u1,books,b1,4,1\nu1,books,b2,5,2\n"})
  assert {r["item_text"] for r in _process(src)["items"]} == {"a\u2028b", "c"}


def test_one_megabyte_text_field_is_accepted_and_skip_skips(tmp_path):
  big = "word " * 200_000
  items = f"item_id,domain,title\nb1,books,{big}\nb2,books,x\nb3,books,y,{big}\n"
  src = _source(tmp_path, {"items.csv": items, "interactions.csv": HEADER +
                           "u1,books,b1,4,1\nu1,books,b2,5,2\n"})
  out = load_and_process(SourceConfig("byo", str(src), bad_rows="skip", processing=SECRET))
  assert {r["item_id"]: len(r["item_text"]) for r in out["items"]} == {"b1": len(big.strip()),
                                                                       "b2": 1}
  assert out["report"]["by_reason"] == {"malformed_row": 1}
  assert "items.csv:line 4: more fields" in out["report"]["examples"][0]


def test_skip_counts_and_prints_why(tmp_path, caplog):
  bad = "u3,books,b1,50,30\n   ,books,b1,4,31\nu3,books,b1,true,32\nu3,games,g1,4,33\n"
  src = _source(tmp_path, {"interactions.csv": HEADER + GOOD + bad})
  with caplog.at_level(logging.WARNING):
    out = load_and_process(SourceConfig("byo", str(src), bad_rows="skip", processing=SECRET))
  assert out["report"]["skipped_rows"] == 4
  assert out["report"]["by_reason"] == {"bad_label": 2, "empty_id": 1, "unknown_domain": 1}
  assert "skipped 4 bad row(s)" in caplog.text and "bad_label 2" in caplog.text
  books = next(d for d in out["domains"] if d["name"] == "books")
  assert (books["min_rating"], books["max_rating"]) == (1.0, 5.0)  # the 50 did not stretch it


def test_duplicates_keep_the_latest_and_never_leak_the_target(tmp_path, caplog):
  rows = ("u1,books,b1,5,1\nu1,books,b2,2,2\nu1,books,b3,4,3\nu1,books,b4,1,4\n"
          "u1,books,b1,5,5\n"  # b1 again, later: it becomes the test target
          "u2,books,b1,3,1\nu2,books,b2,4,2\nu2,books,b3,5,3\n")
  src = _source(tmp_path, {"interactions.csv": HEADER + rows})
  with caplog.at_level(logging.WARNING):
    out = _process(src)
  assert out["report"]["duplicates_dropped"] == {"books": 1}
  assert "repeated (user, domain, item)" in caplog.text
  test = [r for r in out["examples"]["test"] if r["item_id"] == "b1" and r["order"] == 5.0]
  assert len(test) == 1
  assert test[0]["profile"] and "books: book 1 (" not in test[0]["profile"]  # not in its own profile
  every = [r for split in out["examples"].values() for r in split]
  assert sum(r["item_id"] == "b1" and r["user_key"] == test[0]["user_key"] for r in every) == 1


def test_stale_incomplete_folder_is_removed(tmp_path):
  src = _source(tmp_path, {})
  data_dir = tmp_path / "tfds"
  stale = data_dir / "cross_domain" / "byo_old" / "incomplete.ABC123_1.1.0"
  stale.mkdir(parents=True)
  (stale / "part").write_text("x")
  builder.prepare("byo", str(src), data_dir=str(data_dir), processing=SECRET)
  assert not stale.exists()


def test_concurrent_prepares_wait_on_the_lock(tmp_path, capfd):
  src = _source(tmp_path, {})
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  result = {}
  with builder._DirectoryLock(data_dir):  # another prepare holds the data dir
    thread = threading.Thread(target=lambda: result.setdefault(
        "b", builder.prepare("byo", str(src), data_dir=str(data_dir), processing=SECRET)))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and "b" not in result
  thread.join(60)
  assert result["b"].is_prepared()
  assert "another process is preparing data" in capfd.readouterr().err


def test_rating_scales_from_the_cli_form():
  config = base_config()
  config.data.rating_scales = "books=1:5, movies=0.5:5"
  config.data.domain_tasks = "music=implicit"
  assert labels.parse_rating_scales(config.data.rating_scales) == (("books", 1.0, 5.0),
                                                                   ("movies", 0.5, 5.0))
  assert labels.parse_domain_tasks(config.data.domain_tasks) == (("music", "implicit"),)
  with pytest.raises(DataError, match=r"data\.rating_scales: 'books=5' is not DOMAIN=MIN:MAX"):
    labels.parse_rating_scales("books=5")
  with pytest.raises(DataError, match=r"data\.domain_tasks: music=clicks"):
    labels.parse_domain_tasks("music=clicks")


def test_movielens_title_with_latin1_x85_stays_one_item(tmp_path):
  from crossrec_jax.data import movielens  # pylint: disable=import-outside-toplevel
  flags = "|".join(["0"] * 18 + ["1"])
  (tmp_path / "u.item").write_bytes(b"1|Caf\x85 Society (1995)|01-Jan-1995||http://x|" +
                                    flags.encode() + b"\n2|Other (1995)|01-Jan-1995||http://y|" +
                                    flags.encode() + b"\n")
  (tmp_path / "u.data").write_bytes(b"1\t1\t4\t10\n1\t2\t5\t11\n")
  interactions, items = movielens.read_movielens(tmp_path)
  assert len(interactions) == 2 and len(items) == 2
  assert items[("movies", "1")].text.startswith("Caf\x85 Society (1995)")


def test_jsonl_list_tags_are_tags(tmp_path):
  rows = [{"item_id": "b1", "domain": "books", "title": "x", "tags": ["sci-fi", "space"]},
          {"item_id": "b2", "domain": "books", "title": "y", "tags": "drama"}]
  src = _source(tmp_path, {"items.csv": None, "items.jsonl": _jsonl(rows),
                           "interactions.csv": HEADER + "u1,books,b1,4,1\nu1,books,b2,5,2\n"})
  tags = {r["item_id"]: r["item_tags"] for r in _process(src)["items"]}
  assert tags == {"b1": ["sci-fi", "space"], "b2": ["drama"]}


def test_rating_scales_settable_from_the_train_cli():
  """The train CLI's own flag definitions accept the declarations as --config.data.* overrides."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from crossrec_jax import train  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data.from_config import processing_config  # pylint: disable=import-outside-toplevel
  config_file = str(pathlib.Path(__file__).parents[1] / "configs" / "tiny.py")
  argv = ["train", f"--config={config_file}", "--workdir=/unused",
          "--config.data.rating_scales=books=1:5,movies=1:5",
          "--config.data.domain_tasks=music=implicit"]
  values = flags.FlagValues()
  train._define_flags(values, argv)  # pylint: disable=protected-access
  values(argv)
  settings = processing_config(values.config)
  assert settings.rating_scales == (("books", 1.0, 5.0), ("movies", 1.0, 5.0))
  assert settings.domain_tasks == (("music", "implicit"),)


def test_jsonl_bom_and_parquet_datetimes_are_read(tmp_path):
  import datetime  # pylint: disable=import-outside-toplevel
  rows = [{"user_id": "u1", "domain": "books", "item_id": f"b{i}", "label": 1 + i,
           "timestamp": datetime.datetime(2020, 1, 3 - i)} for i in range(3)]
  items = "\ufeff" + _jsonl([{"item_id": f"b{i}", "domain": "books", "title": f"t{i}"} for i in range(3)])
  src = _source(tmp_path, {"items.csv": None, "items.jsonl": items, "interactions.csv": None,
                           "interactions.parquet": _parquet(rows)})
  out = _process(src)
  # The newest interaction (b0, 3 Jan) is the test target; b2 (1 Jan) is the oldest.
  assert [r["item_id"] for r in out["examples"]["test"]] == ["b0"]
  assert [r["item_id"] for r in out["examples"]["train"]] == ["b2"]
