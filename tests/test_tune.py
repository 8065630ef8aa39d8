"""Stage 2 (``config.encoder_mode = "tune"``): the encoder fine-tuned under the stage-1 model."""

import json

import numpy as np

from crossrec_jax import train
from crossrec_jax.training import tune


def _records(path, split="test"):
  return [json.loads(l)["metrics"] for l in path.read_text().splitlines()
          if json.loads(l)["split"] == split]


def _assert_metrics_close(a, b, atol=1e-6):
  assert set(a) == set(b)
  for domain in a:
    for key in a[domain]:
      np.testing.assert_allclose(a[domain][key], b[domain][key], atol=atol, err_msg=f"{domain} {key}")


def test_tune_starts_from_frozen_then_tunes_resumes_and_serves(tmp_path, capsys):
  from test_frozen import _scores_the_frozen_run  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  run = tmp_path / "run"
  config = lambda epochs: load_config("tiny", **{
      "encoder_mode": "tune", "data.data_dir": str(tmp_path / "tfds"), "tune.epochs": epochs,
      "tune.batch_size": 64, "tune.refresh_items": 32, "tune.learning_rate": 1e-3,
      "tune.encoder_learning_rate": 1e-3})

  # No stage-1 run yet: it is trained first. Zero stage-2 epochs serve exactly stage 1's model:
  # re-encoding with the untouched encoder gives the cached vectors back.
  untouched = train.train_and_evaluate(config(0), run)
  out = capsys.readouterr().out
  assert "training stage 1 first" in out
  frozen_test = _records(run / "metrics.jsonl")[-1]
  _assert_metrics_close(untouched["metrics"], frozen_test)
  cached = np.load(next((run / "text_cache").glob("*.npy")))
  np.testing.assert_allclose(np.load(run / "tune" / tune.VECTORS_FILE), cached, atol=2e-5)

  # One epoch moves the encoder (so the item vectors) and is checkpointed; a longer run resumes.
  tuned = train.train_and_evaluate(config(1), run)
  moved = np.abs(np.load(run / "tune" / tune.VECTORS_FILE) - cached).max()
  assert moved > 1e-3, moved
  assert all(np.isfinite(v) for m in tuned["metrics"].values() for v in m.values())
  capsys.readouterr()
  longer = train.train_and_evaluate(config(2), run)
  assert "Resuming the tune mode after epoch 1" in capsys.readouterr().out
  assert [p.name for p in (run / "tune" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
  assert _records(run / "tune" / "metrics.jsonl")[-1] == longer["metrics"]

  # evaluate and score serve the stage-2 model of the workdir, exactly as it was evaluated.
  from crossrec_jax import evaluate  # pylint: disable=import-outside-toplevel
  _assert_metrics_close(evaluate.evaluate_workdir(run, "test"), longer["metrics"], atol=1e-5)
  assert tune.has_tuned(run)
  _scores_the_frozen_run(config(2), tmp_path)


def test_gs_workdir_stays_a_bucket_url_in_frozen_and_tune(monkeypatch, tmp_path):
  """``gs://bucket/run`` stays a bucket URL through stage 1 (train, load) and stage 2 (its
  checkpoint directory, the tuned item vectors) all the way to Orbax and the bucket (pathlib would
  make it ``gs:/bucket/run``, a local folder). No network: Orbax's manager is faked, etils'
  ``mock_epath`` puts the bucket in a local folder, and the data, encoder and training are stubs."""
  import dataclasses
  import os
  import types

  import ml_collections
  import pytest
  from etils import epath
  from etils.epath import testing as epath_testing
  from flax import nnx

  from crossrec_jax import checkpoint as ckpt_lib, served, text_cache

  monkeypatch.chdir(tmp_path)  # a collapsed gs:/bucket/run would be created here, not in the repo
  store = tmp_path / "store"   # the bucket's contents: gs://bucket/x -> store/bucket/x

  def to_store(p):
    p = os.fspath(p) if isinstance(p, (str, os.PathLike)) else p
    if isinstance(p, str) and p.startswith("gs://"):
      return str(store / p[len("gs://"):])
    return p

  def redirect(fn, *args, **kwargs):
    return fn(*map(to_store, args), **kwargs)

  seen = []  # the directories Orbax's manager is given

  class FakeManager:
    def __init__(self, directory, **kwargs):
      del kwargs
      seen.append(str(directory))

    def all_steps(self):
      return []

    def save(self, step, **kwargs):
      del step, kwargs

    def wait_until_finished(self):
      pass

    def close(self):
      pass

  class FakeEncoder:  # what text_cache.cached_vectors needs of the frozen encoder
    dim = 3

    def __init__(self, checkpoint):
      del checkpoint

    def fingerprint(self):
      return "fake"

    def encode(self, texts, max_length, progress=False):
      del max_length, progress
      return np.ones((len(texts), self.dim), np.float32)

  @dataclasses.dataclass
  class Settings:
    epochs: int = 1

  calls = {"encoder": [], "metrics": []}  # the workdirs the encoder / metrics writer are given

  def model_checkpoint(config, workdir):
    calls["encoder"].append(str(workdir))
    return "encoder"

  data = types.SimpleNamespace(item_texts=["a", "b"], domains=[], num_users=1, num_items=2)
  monkeypatch.setattr(ckpt_lib.ocp, "CheckpointManager", FakeManager)
  monkeypatch.setattr(text_cache, "TextEncoder", FakeEncoder)
  monkeypatch.setattr(stage1_run, "resolve_link_secret", lambda config: types.SimpleNamespace(
      digest="d", origin="test", file=""))
  monkeypatch.setattr(stage1_run, "prepare_data", lambda config, secret: None)
  monkeypatch.setattr(stage1_run, "InteractionData",
                      types.SimpleNamespace(from_builder=lambda builder: data))
  monkeypatch.setattr(stage1_run, "resolve_model_checkpoint", model_checkpoint)
  monkeypatch.setattr(stage1_run, "HybridSettings",
                      types.SimpleNamespace(from_config=lambda config, data: Settings()))
  monkeypatch.setattr(stage1_run, "fit_hybrid", lambda *a, **k: types.SimpleNamespace(
      model=nnx.Linear(1, 1, rngs=nnx.Rngs(0))))
  monkeypatch.setattr(stage1_run, "evaluate_and_report",
                      lambda model, data, step, workdir, label: calls["metrics"].append(str(workdir)))
  config = ml_collections.ConfigDict({"data": {"item_max_length": 8}})

  ops = ("open", "copy", "rename", "exists", "glob", "walk", "isdir", "listdir", "makedirs",
         "mkdir", "remove", "replace", "rmtree", "stat")
  with epath_testing.mock_epath(**{op: redirect for op in ops}):
    served.train_and_evaluate(config, "gs://bucket/run")  # the default (stage-1) training
    assert seen == ["gs://bucket/run/checkpoints"], seen
    assert calls == {"encoder": ["gs://bucket/run"], "metrics": ["gs://bucket/run"]}, calls
    assert len(list((store / "bucket" / "run" / "text_cache").glob("*.npy"))) == 1

    (store / "bucket" / "run" / "tune" / "checkpoints").mkdir(parents=True)
    assert not tune.has_tuned("gs://bucket/run")  # an empty stage-2 checkpoint folder
    assert seen[-1] == "gs://bucket/run/tune/checkpoints", seen
    with pytest.raises(ckpt_lib.CheckpointIncompatibleError, match="^gs://bucket/run: no stage-1"):
      tune.load("gs://bucket/run", config)       # no stage-2 model: stage 1's, via served.load
    assert seen[-1] == "gs://bucket/run/checkpoints" and calls["encoder"][-1] == "gs://bucket/run"

    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    tune._write_vectors(epath.Path("gs://bucket/run"), vectors)  # pylint: disable=protected-access
    assert (store / "bucket" / "run" / "tune" / tune.VECTORS_FILE).is_file()
    np.testing.assert_array_equal(
        tune._read_vectors(epath.Path("gs://bucket/run"), 2), vectors)  # pylint: disable=protected-access
  assert not (tmp_path / "gs:").exists()  # nothing went to a collapsed local gs:/bucket path
