"""benchmarks/bench_quality.py: whole runs on bring-your-own directories (explicit and implicit
domains; with and without text columns) with the tiny encoder, the JSON rows, and its flags."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # pylint: disable=wrong-import-position

from crossrec_jax.errors import UsageError  # pylint: disable=wrong-import-position
from crossrec_jax.data import SyntheticConfig, synthetic  # pylint: disable=wrong-import-position


@pytest.fixture(scope="module")
def byo_dir(tmp_path_factory):
  return synthetic.export(tmp_path_factory.mktemp("byo"),
                          SyntheticConfig(num_users=60, items_per_domain=24, seed=0))


def _run(data_dir, tiny_checkpoint, tmp_path, *extra):
  out = tmp_path / "rows.json"
  bench_quality.main([
      "--data", str(data_dir), "--data_dir", str(tmp_path / "tfds"), "--model", str(tiny_checkpoint),
      "--text_cache", str(tmp_path / "text"), "--json", str(out), "--mf_ranks", "2",
      "--mf_regs", "0.1", "--bias_regs", "5", "--knn_k", "5,20", "--knn_shrink", "0,10",
      "--config.hybrid.epochs=2", *extra])
  return json.loads(out.read_text())["rows"]


def test_whole_run_on_a_bring_your_own_directory(byo_dir, tiny_checkpoint, tmp_path, capsys):
  rows = _run(byo_dir, tiny_checkpoint, tmp_path)
  out = capsys.readouterr().out
  assert "movies (explicit" in out and "music HR@10" in out
  methods = lambda domain: {r["method"] for r in rows if r["domain"] == domain}  # noqa: E731
  rating = {"global mean", "item mean", "user+item bias", "biased MF (ALS)", "I-AutoRec",
            "ours (hybrid: text + ID + history)", "ours without text", "ours without implicit term",
            "ours without biases", "ours with APR", "ours, ensemble (hybrid + I-AutoRec, mean)"}
  assert methods("books") == methods("movies") == rating
  ranking = {"popularity", "item-kNN", "EASE", "BPR (ID only)", "text-kNN (content)",
             "ours, neural alone (text + ID + history)", "ours, text only", "ours, ID only",
             "ours, target-domain history only", "CF fusion: item-kNN + EASE (no neural part)",
             "CF + text fusion: item-kNN + EASE + text-kNN (no network)",
             "ours, served: item-kNN + EASE + text-kNN + neural (fused)"}
  assert methods("music") == methods("all") == ranking   # one implicit domain: no single-domain row
  for r in rows:
    assert r["metric"] in {"rmse", "mae", "hr@10", "ndcg@10"}
    assert r["ours"] == r["method"].startswith("ours"), r
    assert 0 <= r["value"] <= (5 if r["metric"] in ("rmse", "mae") else 1), r
  whole = [r for r in rows if "slice" not in r]
  assert len(whole) == len({(r["method"], r["domain"], r["metric"]) for r in whole})
  # The totals over all implicit targets equal the one implicit domain's figures here.
  for m in ranking:
    for metric in ("hr@10", "ndcg@10"):
      pick = lambda d: next(r["value"] for r in whole  # noqa: E731
                            if (r["method"], r["domain"], r["metric"]) == (m, d, metric))
      assert pick("all") == pytest.approx(pick("music"))
  # Paired differences of the served model against each baseline: the difference of the
  # table's figures over the same targets, with a standard error.
  paired = json.loads((tmp_path / "rows.json").read_text())["paired"]
  assert {(p["versus"], p["metric"]) for p in paired} == {
      (v, m) for v in ("item-kNN", "EASE", "CF fusion: item-kNN + EASE (no neural part)",
                       "CF + text fusion: item-kNN + EASE + text-kNN (no network)")
      for m in ("hr@10", "ndcg@10")}
  value = {(r["method"], r["metric"]): r["value"] for r in whole if r["domain"] == "all"}
  for p in paired:
    assert p["difference"] == pytest.approx(value[(p["method"], p["metric"])] -
                                            value[(p["versus"], p["metric"])], abs=1e-12)
    assert p["standard_error"] >= 0


def test_a_folder_without_text_or_split_columns_runs_unchanged(byo_dir, tiny_checkpoint, tmp_path):
  plain = tmp_path / "plain"
  plain.mkdir()
  items = (byo_dir / "items.csv").read_text().splitlines()
  header = items[0].split(",")
  keep = [header.index("item_id"), header.index("domain")]
  (plain / "items.csv").write_text("\n".join(
      ",".join(row.split(",")[k] for k in keep) for row in items) + "\n")
  interactions = (byo_dir / "interactions.csv").read_text()
  assert "split" not in interactions.splitlines()[0]
  (plain / "interactions.csv").write_text(interactions)
  rows = _run(plain, tiny_checkpoint, tmp_path, "--no_ablations")
  assert {"ours (hybrid: text + ID + history)",
          "ours, served: item-kNN + EASE + text-kNN + neural (fused)"} <= {
      r["method"] for r in rows}


def test_missing_data_directory_is_a_clear_error(tmp_path):
  with pytest.raises(UsageError, match="not a directory"):
    bench_quality.main(["--data", str(tmp_path / "absent"), "--skip_model"])


def test_model_overrides_are_checked(tmp_path):
  args = bench_quality.parse_args(["--data", str(tmp_path), "--config.hybrid.dim=16",
                                   "--config.hybrid.adversarial=apr",
                                   "--config.hybrid.learning_rate=1e-3"])
  assert args.hybrid == {"dim": 16, "adversarial": "apr", "learning_rate": 1e-3}
  for bad, message in (("--config.hybrid.no_such_field=1", "no field"),
                       ("--config.hybrid.dim", "KEY=VALUE")):
    with pytest.raises(UsageError, match=message):
      bench_quality.parse_args(["--data", str(tmp_path), bad])
