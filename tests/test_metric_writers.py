"""metric_writers: the metrics.jsonl record format, TensorBoard events, process 0 only, and the
train window (mean over its steps on device, throughput without the compile step)."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crossrec_jax import metric_writers


def _tensorboard_scalars(logdir):
  """{tag: [(step, value)]} read back from the tensorboardX event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  found = {}
  files = sorted(logdir.glob("events.out.tfevents.*"))
  assert files
  for path in files:
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        found.setdefault(value.tag, []).append((event.step, value.simple_value))
  return found


def test_jsonl_records_and_tensorboard_events(tmp_path):
  with metric_writers.create_default_writer(tmp_path) as writer:
    writer.write_scalars(2, {"train/loss": np.float32(0.5), "train/grad_norm": 1.5,
                             "train/learning_rate": 1e-3, "train/examples_per_second": 80.0})
    results = {"books": {"n": 40, "rmse": 0.9}, "music": {"n": 12, "ndcg@10": 0.25}}
    writer.write_scalars(6, metric_writers.flatten(results, "valid/"))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  # The exact record format (key order included) that earlier versions wrote and readers parse.
  assert lines == [
      json.dumps({"step": 2, "split": "train", "metrics": {"loss": 0.5, "grad_norm": 1.5},
                  "learning_rate": 1e-3, "examples_per_second": 80.0}),
      json.dumps({"step": 6, "split": "valid", "metrics": results})]
  assert isinstance(json.loads(lines[1])["metrics"]["books"]["n"], int)
  scalars = _tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars["train/loss"] == [(2, 0.5)]
  assert scalars["train/examples_per_second"] == [(2, 80.0)]
  assert scalars["valid/music/ndcg_at_10"] == [(6, 0.25)]
  assert scalars["valid/books/n"] == [(6, 40.0)]


def test_processes_other_than_zero_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metric_writers.create_default_writer(tmp_path / "run")
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()


def test_train_window_is_the_mean_of_its_steps_and_restarts_empty():
  window = metric_writers.TrainWindow()
  losses = [0.5, 2.0, 4.0]
  for i, loss in enumerate(losses):
    window.add({"loss": jnp.float32(loss), "grad_norm": jnp.asarray(i, jnp.bfloat16)}, 8)
  means, rate = window.read()
  assert means == pytest.approx({"loss": np.mean(losses), "grad_norm": 1.0})
  assert rate is None  # the clock never started: nothing but untimed (compile) steps
  window.add({"loss": jnp.float32(1.0), "grad_norm": jnp.float32(0.0)}, 8)  # untimed
  window.restart_clock()
  for loss in (3.0, 5.0):
    window.add({"loss": jnp.float32(loss), "grad_norm": jnp.float32(0.0)}, 8)
  means, rate = window.read()
  assert means["loss"] == pytest.approx(3.0)  # all three steps since the last read
  assert rate is not None and rate > 0


def test_a_nan_in_any_step_makes_the_window_loss_non_finite():
  window = metric_writers.TrainWindow()
  for loss in (1.0, float("nan"), 1.0):
    window.add({"loss": jnp.float32(loss)}, 8)
  assert not np.isfinite(window.read()[0]["loss"])
