"""The licensed real data sets in ../shared/data prepare through the builders (skipped where absent)."""

import json

import pytest

from conftest import SHARED_DATA
from crossrec_jax.data import ProcessingConfig, builder, metadata
from crossrec_jax.data.builder import decode_text


def _show(capsys, name, b):
  md = metadata(b)
  src = b.as_data_source()
  example = src["test"][0]
  with capsys.disabled():
    print(f"\n[{name}] counts: {json.dumps(md['counts'])}")
    print(f"[{name}] split sizes: { {k: len(v) for k, v in src.items()} }")
    print(f"[{name}] example profile ({decode_text(example['domain'])} target "
          f"{decode_text(example['item_id'])}): {decode_text(example['profile'])[:400]}")
  return md, src


@pytest.mark.skipif(not (SHARED_DATA / "amazon-arts-office").is_dir(), reason="../shared/data absent")
def test_amazon_arts_office_prepares(tmp_path, capsys):
  b = builder.prepare("byo", str(SHARED_DATA / "amazon-arts-office"), data_dir=str(tmp_path))
  md, src = _show(capsys, "amazon-arts-office", b)
  assert {d["name"]: d["task"] for d in md["domains"]} == {"arts": "implicit", "office": "implicit"}
  assert md["counts"]["users"] == 9577
  assert md["counts"]["domains"]["arts"]["items"] == 18639
  assert len(src["test"]) == 2000  # 1,000 test users x 2 domains
  test_users = {decode_text(src["test"][i]["user_key"]) for i in range(len(src["test"]))}
  assert len(test_users) == 1000
  assert not any(src["test"][i]["user_in_train"] for i in range(0, 2000, 50))  # cold user IDs


@pytest.mark.skipif(not (SHARED_DATA / "ml-100k").is_dir(), reason="../shared/data absent")
def test_movielens_100k_prepares(tmp_path, capsys):
  b = builder.prepare("movielens", str(SHARED_DATA / "ml-100k"), data_dir=str(tmp_path),
                      processing=ProcessingConfig(split="ratio", ratio=(0.8, 0.0, 0.2), seed=0))
  md, src = _show(capsys, "ml-100k", b)
  assert md["counts"]["users"] == 943 and md["counts"]["domains"]["movies"]["items"] == 1682
  assert len(src["train"]) + len(src["test"]) == 100_000
