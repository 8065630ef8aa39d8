"""benchmarks/bench_quality.py: its baselines against direct formulas, and one whole run on a
bring-your-own directory (explicit and implicit domains) with the tiny model."""

import json
import pathlib
import sys

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # pylint: disable=wrong-import-position

from crossrec_jax.data import SyntheticConfig, synthetic  # pylint: disable=wrong-import-position


def test_ease_matches_the_closed_form():
  rng = np.random.default_rng(0)
  dense = (rng.random((40, 12)) < 0.3).astype(float)
  dense[:, 5] = 0  # an item nobody touched stays out of the solve
  X = sp.csr_matrix(dense)
  active, B = bench_quality.ease_weights(X, lam=3.0)
  assert 5 not in active
  Xa = X[:, active].toarray()
  P = np.linalg.inv(Xa.T @ Xa + 3.0 * np.eye(len(active)))
  expected = np.eye(len(active)) - P / np.diag(P)
  np.testing.assert_allclose(B, expected, atol=1e-5)
  assert np.all(np.diag(B) == 0)


def test_biased_mf_recovers_a_low_rank_rating_matrix():
  rng = np.random.default_rng(0)
  n_users, n_items, rank = 60, 50, 2
  truth = 3.0 + rng.normal(0, 0.3, (n_users, 1)) + rng.normal(0, 0.3, (1, n_items)) + \
      rng.normal(0, 0.7, (n_users, rank)) @ rng.normal(0, 0.7, (rank, n_items))
  seen = rng.random((n_users, n_items)) < 0.7
  u, i = np.nonzero(seen)
  test_u, test_i = np.nonzero(~seen)
  mf = bench_quality.fit_biased_mf(u, i, truth[u, i], n_users, n_items, rank=2, reg=0.01)
  bias = bench_quality.fit_biases(u, i, truth[u, i], n_users, n_items, reg=1.0)
  mf_rmse = np.sqrt(np.mean((mf(test_u, test_i) - truth[test_u, test_i]) ** 2))
  bias_rmse = np.sqrt(np.mean((bias(test_u, test_i) - truth[test_u, test_i]) ** 2))
  assert mf_rmse < 0.05 and bias_rmse > 0.5, (mf_rmse, bias_rmse)


@pytest.fixture(scope="module")
def byo_dir(tmp_path_factory):
  return synthetic.export(tmp_path_factory.mktemp("byo"),
                          SyntheticConfig(num_users=60, items_per_domain=24, seed=0))


def test_whole_run_on_a_bring_your_own_directory(byo_dir, tiny_checkpoint, tmp_path, capsys):
  bench_quality.main([
      "--data", str(byo_dir), "--workdir", str(tmp_path), "--model", str(tiny_checkpoint),
      "--steps", "2", "--batch_size", "8", "--user_max_length", "16", "--item_max_length", "8",
      "--dim", "32", "--mf_ranks", "2", "--mf_regs", "0.1", "--bias_regs", "5",
      "--ease_lambdas", "10", "20", "--bpr_epochs", "1"])
  out = capsys.readouterr().out
  results = json.loads((tmp_path / "results.json").read_text())
  # Explicit domains get the rating table, the implicit one the ranking table.
  assert set(results["rating"]) == {"books", "movies"}
  methods = {"global mean", "user+item bias", "biased MF (ALS)",
             "ours, trained on this domain only", "ours, all domains (text + ID)"}
  for domain, rows in results["rating"].items():
    assert set(rows) == methods, domain
    assert all(0 < m["rmse"] < 4 and m["mae"] <= m["rmse"] for m in rows.values())
    assert rows["biased MF (ALS)"]["params"] == {"rank": 2, "reg": 0.1}
  ranking = results["ranking"]
  assert set(ranking) == {"popularity", "item-kNN (cross-domain history)", "EASE (per domain)",
                          "ID-only MF (BPR)", "ours, trained on this domain only",
                          "ours, all domains (text + ID)"}
  n = ranking["popularity"]["music"]["n"]
  for rows in ranking.values():
    m = rows["music"]
    assert m["n"] == n and 0 <= m["ndcg@10"] <= m["hr@10"] <= 1
  assert "music HR@10" in out and "movies (explicit" in out
  # Each model trained on the data it was meant to see.
  def evaluated_domains(run):
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    test = [json.loads(x) for x in lines if json.loads(x)["split"] == "test"][-1]
    return {k for k in test["metrics"] if "/" not in k}
  assert evaluated_domains("ours_music_only") == {"music"}
  assert evaluated_domains("ours_books_only") == {"books"}
  assert evaluated_domains("ours_all_domains") == {"books", "movies", "music"}


def test_missing_data_directory_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="not a directory"):
    bench_quality.main(["--data", str(tmp_path / "absent"), "--skip_model"])


def test_config_overrides_reach_the_training_config(tmp_path):
  args = bench_quality.parse_args([
      "--data", str(tmp_path), "--workdir", str(tmp_path),
      "--set", "optim.freeze_encoder_layers=-1", "--set", "adversarial.method=none",
      "--set", "loss.rating_weight=3"])
  config = bench_quality.model_config(args, tmp_path, "byo")
  assert config.optim.freeze_encoder_layers == -1
  assert config.adversarial.method == "none"
  assert config.loss.rating_weight == 3.0 and isinstance(config.loss.rating_weight, float)
  for bad, message in (("optim.no_such_field=1", "no config field"), ("optim.learning_rate", "KEY=VALUE")):
    with pytest.raises(SystemExit, match=message):
      bench_quality.model_config(bench_quality.parse_args(
          ["--data", str(tmp_path), "--set", bad]), tmp_path, "byo")
