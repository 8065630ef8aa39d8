"""Batch inference from an end-to-end training checkpoint: consistency with training, 1 vs 8
devices, blocked top-K, streaming outputs, bad inputs (frozen runs: test_serving.py)."""

import csv
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import evaluate as eval_lib
from crossrec_jax import experiment, score
from crossrec_jax.data import SyntheticConfig, synthetic
from crossrec_jax.errors import ScoringError
from crossrec_jax.serving.scorer import Scorer


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tiny_run):
  """The session's finished tiny run (conftest.py), shared with test_train and
  test_checkpoint_layout: read-only here."""
  return tiny_run


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
  """Histories, items and pairs in the bring-your-own layout, from the training data's generator."""
  _, config = trained
  return synthetic.export(tmp_path_factory.mktemp("inputs"), SyntheticConfig(
      num_users=config.data.synthetic_users, items_per_domain=config.data.items_per_domain,
      seed=config.seed))


def test_bulk_scores_equal_training_eval_scores(trained):
  workdir, config = trained
  scorer = Scorer.from_checkpoint(workdir).model
  run, _ = experiment.build_run(config, workdir)
  evaluator = eval_lib.Evaluator(run.graphdef, run.mesh, run.catalog, run.tokenizer,
                                 run.pipe_config, run.model_config)
  preds, records = evaluator.predictions(scorer.params, run.sources["test"])
  users = scorer.encode("user", [r["profile"] for r in records], [r["user_key"] for r in records])
  rows = preds["item_row"]
  items = scorer.encode("item", [run.catalog.texts[r] for r in rows],
                        [f"{run.catalog.domains[run.catalog.domain[r]]}/{run.catalog.item_ids[r]}" for r in rows])
  out = scorer.score_pairs(users, items, np.array([r["domain_index"] for r in records]))
  # Tolerance: same weights and inputs; only the padding length differs (masked positions).
  np.testing.assert_allclose(out["rating"], preds["rating"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["probability"], 1 / (1 + np.exp(-preds["logit"])), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(users, preds["user"], rtol=1e-4, atol=1e-5)


def test_top_k_matches_brute_force_with_exclusions(trained):
  scorer = Scorer.from_checkpoint(trained[0]).model
  rng = np.random.default_rng(0)
  users = rng.normal(size=(13, scorer.model_config.dim)).astype(np.float32)
  items = rng.normal(size=(50, scorer.model_config.dim)).astype(np.float32)
  exclude = [list(rng.choice(50, size=n, replace=False)) for n in rng.integers(0, 6, 13)]
  top, scores = scorer.top_k(users, items, domain=2, k=7, exclude=exclude, item_block=16)
  full = (np.asarray(scorer._project_users(scorer.params, users))[:, 2]
          @ np.asarray(scorer._project_items(scorer.params, items))[:, 2].T)
  for u in range(13):
    full[u, exclude[u]] = -np.inf
    expected = np.argsort(-full[u], kind="stable")[:7]
    # Exact order, each index paired with its own score (no near-ties in these random scores).
    np.testing.assert_array_equal(top[u], expected, err_msg=f"user {u}: top-K order")
    np.testing.assert_allclose(scores[u], full[u, top[u]], rtol=1e-5, atol=1e-5,
                               err_msg=f"user {u}: scores not paired with their items")
    assert np.all(np.diff(scores[u]) <= 0), f"user {u}: scores not descending"
    assert not set(top[u]) & set(exclude[u])


def test_one_and_eight_devices_give_identical_results(trained):
  one = Scorer.from_checkpoint(trained[0], devices=jax.devices()[:1], batch_size=16).model
  eight = Scorer.from_checkpoint(trained[0], batch_size=16).model
  assert eight.mesh.devices.size == 8
  texts = [f"books: the {w} manor. genre: mystery novel (rated {i % 5 + 1})" for i, w in
           enumerate(["dark", "silent", "blue", "red", "haunted", "love"] * 5)]
  a, b = one.encode("user", texts), eight.encode("user", texts)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  ta, sa = one.top_k(a, a, 1, 5)
  tb, sb = eight.top_k(a, a, 1, 5)
  np.testing.assert_array_equal(ta, tb)
  np.testing.assert_allclose(sa, sb, rtol=1e-6)


def _cli(workdir, files, output, *flags):
  return subprocess.run([sys.executable, "-m", "crossrec_jax.score", f"--checkpoint={workdir}",
                         f"--users={files / 'interactions.csv'}", f"--items={files / 'items.csv'}",
                         f"--output={output}", *flags], capture_output=True, text=True, timeout=600)


def test_cli_pairs_and_top_k(trained, files, tmp_path):
  workdir, _ = trained
  out = _cli(workdir, files, tmp_path / "pairs.parquet", f"--pairs={files / 'pairs.csv'}")
  assert out.returncode == 0, out.stderr[-3000:]
  # Without --step the newest step is scored, and the console and the counts say which.
  newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert f"Scoring with checkpoint step {newest} of " in out.stderr, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == newest
  table = pq.read_table(tmp_path / "pairs.parquet")
  n_pairs = sum(1 for _ in open(files / "pairs.csv")) - 1
  assert table.num_rows == n_pairs
  assert table.column_names == ["user_id", "item_id", "domain", "task", "score", "retrieval_score"]
  rows = table.to_pylist()
  assert all(1 <= r["score"] <= 5 for r in rows if r["task"] == "rating")
  assert all(0 <= r["score"] <= 1 for r in rows if r["task"] == "implicit")
  out = _cli(workdir, files, tmp_path / "top.csv", "--top_k=3", "--domains=music,books")
  assert out.returncode == 0, out.stderr[-3000:]
  with open(tmp_path / "top.csv") as f:
    top = list(csv.DictReader(f))
  assert {r["domain"] for r in top} == {"music", "books"}
  assert {r["rank"] for r in top} == {"1", "2", "3"}
  assert json.loads(out.stdout.strip().splitlines()[-1])["rows"] == len(top)
  # No user is recommended an item of their own history in that domain.
  with open(files / "interactions.csv") as f:
    seen = {(r["user_id"], r["domain"], r["item_id"]) for r in csv.DictReader(f)}
  users = {r["user_id"] for r in top}
  assert len(users) > 10
  leaked = [r for r in top if (r["user_id"], r["domain"], r["item_id"]) in seen]
  assert not leaked, f"{len(leaked)} recommended items are in the user's history, e.g. {leaked[:3]}"


def test_cli_step_scores_that_older_step_and_a_missing_step_is_one_line(trained, files, tmp_path,
                                                                        capsys, monkeypatch):
  """``--step N`` restores step N (printed, in the counts, and other scores than the newest
  step's); a step that is not in the workdir is a one-line error naming the steps there."""
  monkeypatch.delenv("CROSSREC_TRACEBACK", raising=False)  # the one-line form is checked
  workdir, _ = trained
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert len(steps) >= 2, steps  # the tiny run keeps steps 3 and 6
  older, newest = steps[0], steps[-1]
  argv = lambda output, *flags: ["score", f"--checkpoint={workdir}",
                                 f"--users={files / 'interactions.csv'}",
                                 f"--items={files / 'items.csv'}",
                                 f"--pairs={files / 'pairs.csv'}", f"--output={output}", *flags]
  scores = {}
  for step, flags in ((older, [f"--step={older}"]), (newest, [])):
    assert score.cli_main(argv(tmp_path / f"{step}.parquet", *flags)) == 0
    out = capsys.readouterr()
    assert f"Scoring with checkpoint step {step} of " in out.err, out.err[-3000:]
    assert json.loads(out.out.strip().splitlines()[-1])["step"] == step
    scores[step] = pq.read_table(tmp_path / f"{step}.parquet").column("score").to_numpy()
  assert not np.allclose(scores[older], scores[newest]), "--step scored the newest weights"
  missing = next(s for s in range(1, newest + 2) if s not in steps)
  code = score.cli_main(argv(tmp_path / "missing.parquet", f"--step={missing}"))
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
  assert f"no step {missing}; available: {steps}" in lines[0], lines[0]
  assert not (tmp_path / "missing.parquet").exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("case,pattern", [
    ("unknown_item", r"pairs\.csv:line 2: field item_id 'zz999' of domain 'books' is not in the items file"),
    ("unknown_domain", r"pairs\.csv:line 2: field domain 'games' is not a domain of this model"),
    ("no_history", r"user 'nobody' has no history in the users file"),
    ("missing_column", r"pairs\.csv: missing column\(s\) \['domain'\]"),
    ("empty_file", r"pairs\.csv: file is empty"),
])
def test_bad_inputs_fail_clearly_and_leave_no_output(trained, files, tmp_path, case, pattern):
  pairs = tmp_path / "pairs.csv"
  pairs.write_text({"unknown_item": "user_id,item_id,domain\nuser00000,zz999,books\n",
                    "unknown_domain": "user_id,item_id,domain\nuser00000,bo0001,games\n",
                    "no_history": "user_id,item_id,domain\nnobody,bo0001,books\n",
                    "missing_column": "user_id,item_id\nuser00000,bo0001\n",
                    "empty_file": ""}[case])
  output = tmp_path / "out.parquet"
  with pytest.raises(Exception, match=pattern):
    score.run_scoring(trained[0], files / "interactions.csv", files / "items.csv", output, pairs=pairs)
  assert not output.exists() and not list(tmp_path.glob("*.partial"))


def test_checkpoint_from_another_model_is_refused(trained, tmp_path):
  import shutil
  workdir = tmp_path / "copy"
  shutil.copytree(trained[0], workdir)
  for meta_file in (workdir / "checkpoints").glob("*/meta/metadata"):
    meta = json.loads(meta_file.read_text())
    meta["model"]["dim"] = 48
    meta_file.write_text(json.dumps(meta))
  with pytest.raises(ckpt_lib.CheckpointIncompatibleError, match=r"does not match this model"):
    Scorer.from_checkpoint(workdir)
  with pytest.raises(ScoringError, match=r"not a training workdir"):
    Scorer.from_checkpoint(tmp_path)


def test_evaluate_workdir_reports_every_domain(trained, capsys):
  from crossrec_jax.evaluate import evaluate_workdir
  results = evaluate_workdir(trained[0], "test")
  assert {"books", "movies", "music"} <= set(results)
  assert "baseline_rmse" in results["books"] and "baseline_hr@10" in results["music"]
  assert "test metrics (ours vs baseline)" in capsys.readouterr().out


def test_scoring_restores_params_only_from_a_full_train_state(trained):
  """The checkpoint holds params + Adam moments in one item (as training writes it); scoring
  reads the params subtree alone, with the same values a full restore gives."""
  workdir, config = trained
  scorer = Scorer.from_checkpoint(workdir).model
  run, _ = experiment.build_run(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    _, full, _, _ = checkpointer.restore(ckpt_lib.abstract_like(run.abstract_state,
                                                                run.state_shardings))
  finally:
    checkpointer.close()
  assert jax.tree.leaves(full.opt_state), "the checkpoint should hold optimizer state"
  assert jax.tree.structure(scorer.params) == jax.tree.structure(full.params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(scorer.params)[0]]
  assert not [p for p in paths if any(k in p for k in ("opt_state", "'mu'", "'nu'", "count"))]
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               scorer.params, full.params)


def test_checkpointer_params_only_restore_reads_no_optimizer_state(tmp_path):
  import optax
  from crossrec_jax.training import steps
  params = {"encoder": {"layers": {0: {"kernel": np.arange(12.0, dtype=np.float32).reshape(3, 4)}}},
            "head": {"bias": np.ones(5, np.float32)}}
  tx = optax.adam(1e-3)
  opt_state = jax.tree.map(lambda x: x + 7, tx.init(params))  # distinguishable from params
  state = steps.TrainState(np.int32(3), params, opt_state, jax.random.PRNGKey(0))
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
  checkpointer.save(3, state, None, {"model": {}})
  checkpointer.save(6, state.replace(params=jax.tree.map(lambda x: x + 6, params)), None,
                    {"model": {}})
  checkpointer.close()
  for f in (tmp_path / "ckpt" / "6" / "params").rglob("*"):  # step 6's arrays corrupt: falls back
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0garbage" * 4)
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
  try:
    step, restored, data_state, _ = checkpointer.restore(abstract, params_only=True)
    with pytest.raises(ckpt_lib.CheckpointIncompatibleError, match="does not match this model"):
      checkpointer.restore({"head": {"bias": jax.ShapeDtypeStruct((6,), np.float32)}},
                           params_only=True)
  finally:
    checkpointer.close()
  assert step == 3 and data_state is None and checkpointer.skipped[0][0] == 6
  assert jax.tree.structure(restored) == jax.tree.structure(params)  # params only, keys as given
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), restored, params)
