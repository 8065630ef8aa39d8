"""Stage 2 (``config.stage = "fine_tune"``): the encoder fine-tuned under the stage-1 model."""

import json

import numpy as np

from crossrec_jax import stage2, train


def _records(path, split="test"):
  return [json.loads(l)["metrics"] for l in path.read_text().splitlines()
          if json.loads(l)["split"] == split]


def _assert_metrics_close(a, b, atol=1e-6):
  assert set(a) == set(b)
  for domain in a:
    for key in a[domain]:
      np.testing.assert_allclose(a[domain][key], b[domain][key], atol=atol, err_msg=f"{domain} {key}")


def test_stage2_starts_at_stage1_then_fine_tunes_resumes_and_serves(tmp_path, capsys):
  from test_stage1 import _scores_the_stage1_run  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  run = tmp_path / "run"
  config = lambda epochs: load_config("tiny", **{
      "stage": "fine_tune", "data.data_dir": str(tmp_path / "tfds"), "fine_tune.epochs": epochs,
      "fine_tune.batch_size": 64, "fine_tune.refresh_items": 32, "fine_tune.learning_rate": 1e-3,
      "fine_tune.encoder_learning_rate": 1e-3})

  # No stage-1 run yet: it is trained first. Zero stage-2 epochs serve exactly stage 1's model:
  # re-encoding with the untouched encoder gives the cached vectors back.
  untouched = train.train_and_evaluate(config(0), run)
  out = capsys.readouterr().out
  assert "training stage 1 first" in out
  stage1_test = _records(run / "metrics.jsonl")[-1]
  _assert_metrics_close(untouched["metrics"], stage1_test)
  cached = np.load(next((run / "text_cache").glob("*.npy")))
  np.testing.assert_allclose(np.load(run / "fine_tune" / stage2.VECTORS_FILE), cached, atol=2e-5)

  # One epoch moves the encoder (so the item vectors) and is checkpointed; a longer run resumes.
  tuned = train.train_and_evaluate(config(1), run)
  moved = np.abs(np.load(run / "fine_tune" / stage2.VECTORS_FILE) - cached).max()
  assert moved > 1e-3, moved
  assert all(np.isfinite(v) for m in tuned["metrics"].values() for v in m.values())
  capsys.readouterr()
  longer = train.train_and_evaluate(config(2), run)
  assert "Resuming stage 2 after epoch 1" in capsys.readouterr().out
  assert [p.name for p in (run / "fine_tune" / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
  assert _records(run / "fine_tune" / "metrics.jsonl")[-1] == longer["metrics"]

  # evaluate and score serve the stage-2 model of the workdir, exactly as it was evaluated.
  from crossrec_jax import evaluate  # pylint: disable=import-outside-toplevel
  _assert_metrics_close(evaluate.evaluate_workdir(run, "test"), longer["metrics"], atol=1e-5)
  assert stage2.has_stage2(run)
  _scores_the_stage1_run(config(2), tmp_path)
