"""Checkpoint layout: params and the rest of the train state are separate Orbax items, serving
reads the params item alone, and checkpoints written before the split (one ``state`` item holding
the whole train state) still resume and still score."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pyarrow.parquet as pq
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import experiment, score, train
from crossrec_jax.training import steps
from crossrec_jax.models import BertConfig, CrossDomainRecommender, RecommenderConfig

from test_score import _cli, files, trained  # pylint: disable=unused-import  # fixtures
from test_train import _final_params, load_config


def write_old_layout(directory, step, state, data_iter_state, meta):
  """Saves ``step`` as Checkpointer.save did before params had an item of their own (a9c4e6d):
  one StandardCheckpointHandler item ``state`` holding the whole train state."""
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy([policies.LatestN(2)]),
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  with ocp.CheckpointManager(directory, options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "data_iter": ocp.JsonCheckpointHandler(),
      "meta": ocp.JsonCheckpointHandler()}) as manager:
    manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(json.loads(data_iter_state) if data_iter_state else {}),
        meta=ocp.args.JsonSave(meta)))


def _restore_all(workdir, abstract, **kwargs):
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    return [checkpointer.restore(abstract, max_step=s, **kwargs) for s in checkpointer.all_steps()]
  finally:
    checkpointer.close()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_checkpoint_from_before_the_split_resumes_and_scores(trained, files, tmp_path, capsys):
  workdir, config = trained
  assert {"params", "state"} <= {p.name for p in (workdir / "checkpoints" / "6").iterdir()}
  run, _ = experiment.build_run(config, workdir)
  abstract = ckpt_lib.abstract_like(run.abstract_state, run.state_shardings)
  new = _restore_all(workdir, abstract)
  old_dir = tmp_path / "old"
  shutil.copytree(workdir, old_dir, ignore=shutil.ignore_patterns("checkpoints"))
  for step, state, data_state, meta in new:
    write_old_layout(old_dir / "checkpoints", step, state, data_state, meta)
  assert {p.name for p in (old_dir / "checkpoints" / "6").iterdir()} >= {"state", "data_iter"}
  assert not (old_dir / "checkpoints" / "6" / "params").exists()

  # Full (resume) and params-only (serving) restores give what the new layout gives.
  for (s_old, state_old, data_old, _), (s_new, state_new, data_new, _) in zip(
      _restore_all(old_dir, abstract), new):
    assert s_old == s_new and data_old == data_new and data_old
    _assert_trees_equal(state_old, state_new)
  params_old = _restore_all(old_dir, abstract.params, params_only=True)[-1][1]
  _assert_trees_equal(params_old, new[-1][1].params)

  # The scoring CLI serves the old checkpoint with the same scores as the new one.
  out = _cli(old_dir, files, tmp_path / "old.parquet", f"--pairs={files / 'pairs.csv'}")
  assert out.returncode == 0, out.stderr[-3000:]
  score.run_scoring(workdir, files / "interactions.csv", files / "items.csv",
                    tmp_path / "new.parquet", pairs=files / "pairs.csv")
  assert pq.read_table(tmp_path / "old.parquet").equals(pq.read_table(tmp_path / "new.parquet"))

  # Training resumes from the old layout exactly as from the new one, and saves the new layout.
  longer = load_config(**{"data.data_dir": config.data.data_dir, "train_steps": 9})
  new_dir = tmp_path / "new"
  shutil.copytree(workdir, new_dir)
  capsys.readouterr()
  train.train_and_evaluate(longer, old_dir)
  assert "Resuming from checkpoint step 6" in capsys.readouterr().out
  train.train_and_evaluate(longer, new_dir)
  assert (old_dir / "checkpoints" / "9" / "params").is_dir()
  (step_old, params_old), (step_new, params_new) = _final_params(old_dir), _final_params(new_dir)
  assert step_old == step_new == 9
  _assert_trees_equal(params_old, params_new)


def test_scoring_a_bert_base_checkpoint_restores_no_optimizer_state(trained, tmp_path,
                                                                    monkeypatch):
  """A real BERT-base-shaped train state (110M parameters plus Adam's two moments, zeros, which
  Orbax compresses to a few hundred KB) is saved as training saves it; the Scorer restores the
  params tree alone and asks Orbax for no item holding optimizer state."""
  workdir, _ = trained
  bert_dir = tmp_path / "bert"
  shutil.copytree(workdir, bert_dir, ignore=shutil.ignore_patterns("checkpoints"))
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  meta = checkpointer.read_meta(checkpointer.all_steps()[-1])
  checkpointer.close()
  meta["model"]["bert"] = dataclasses.asdict(BertConfig())  # the defaults are BERT-base's
  model_config = RecommenderConfig.from_dict(meta["model"])
  bert = model_config.bert
  assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads,
          bert.intermediate_size, bert.vocab_size) == (768, 12, 12, 3072, 30522)
  abstract = nnx.eval_shape(lambda: CrossDomainRecommender(model_config, rngs=nnx.Rngs(0)))
  abstract_params = nnx.to_pure_dict(nnx.split(abstract, nnx.Param)[1])
  abstract_opt = jax.eval_shape(optax.adam(1e-3).init, abstract_params)
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
  state = steps.TrainState(np.int32(1), zeros(abstract_params), zeros(abstract_opt),
                           np.zeros(2, np.uint32))
  checkpointer = ckpt_lib.Checkpointer(bert_dir / "checkpoints", async_save=False)
  checkpointer.save(1, state, None, meta)
  checkpointer.close()
  del state
  assert (bert_dir / "checkpoints" / "1" / "state").is_dir()  # the moments are on disk

  requested = []  # the Orbax items each restore asks for
  real_restore = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    requested.append(set(kwargs["args"].keys()))
    return real_restore(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  scorer = score.Scorer.from_checkpoint(bert_dir, devices=jax.devices()[:1]).model

  assert {"params"} in requested and all(items <= {"params", "meta"} for items in requested)
  assert jax.tree.structure(scorer.params) == jax.tree.structure(abstract_params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(scorer.params)[0]]
  assert not [p for p in paths if any(k in p for k in ("opt_state", "'mu'", "'nu'", "count"))]
  leaves = jax.tree.leaves(scorer.params)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  assert sum(x.size for x in leaves) == n_params > 100e6  # BERT-base: ~110M
  assert sum(x.nbytes for x in leaves) == 4 * n_params  # params only, float32, one device
  assert sum(x.shape == (768, 3072) for x in leaves) == 12  # one FFN kernel per layer
