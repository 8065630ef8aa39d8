"""The frozen mode on the one loop: sharded over 8 devices it trains exactly as on one, its ID
tables and item matrix split over the devices; its batches resume exactly; SIGTERM saves and
exits 143; a NaN loss stops with no checkpoint written."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from crossrec_jax import errors, sharding, train
from crossrec_jax.training import loop
from crossrec_jax.training.hybrid import HybridBatches, build_trainer
from test_frozen import _planted_sequences, _settings  # pylint: disable=wrong-import-position
from test_train import load_config  # pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _losses(data, settings, mesh, text=None):
  trainer = build_trainer(data, settings, text=text, mesh=mesh)
  logged = []
  result = loop.run_loop(loop.LoopSettings(total_steps=trainer.total_steps, log_every=1),
                         trainer.init_state(), trainer.step, trainer.batches(), start=0,
                         on_log=lambda step, s: logged.append(s["train/loss"]),
                         examples=lambda b: b[2], show_progress=False)
  return np.array(logged), result.state


def test_eight_devices_train_as_one_with_tables_split_eight_ways():
  assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices
  data = _planted_sequences(users=200)
  text = np.random.default_rng(0).normal(size=(data.num_items, 16)).astype(np.float32)
  settings = _settings(data, epochs=3, dim=16, batch_size=256, num_negatives=16)
  one, _ = _losses(data, settings, sharding.create_mesh({"data": -1}, jax.devices()[:1]), text)
  eight, state = _losses(data, settings, sharding.create_mesh({"data": -1}), text)
  print(f"\n[frozen sharding] losses 1 device {one}\n[frozen sharding] losses 8 devices {eight}")
  assert len(one) == len(eight) > 3
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  params = state.params
  for name in ("item_factors", "user_factors", "history_factors", "item_bias"):
    array = params[name]
    per_device = {s.data.nbytes for s in array.addressable_shards}
    assert per_device == {array.nbytes // 8}, (name, per_device, array.nbytes)
  # Adam's moments are placed like their parameters.
  moments = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == params["item_factors"].shape]
  assert moments and all(m.addressable_shards[0].data.nbytes == m.nbytes // 8 for m in moments)


def test_batches_resume_exactly_mid_epoch():
  data = _planted_sequences(users=120)
  settings = _settings(data, epochs=3, dim=8, batch_size=64, num_negatives=8)
  trainer = build_trainer(data, settings, mesh=sharding.create_mesh({"data": -1}, jax.devices()[:1]))
  straight = trainer.batches()
  per_epoch = len(straight.schedule)
  for _ in range(per_epoch + 2):  # into the second epoch
    next(straight)
  resumed = trainer.batches()
  resumed.set_state(straight.get_state())
  for _ in range(per_epoch + 1):
    (da, a, na), (db, b, nb) = next(straight), next(resumed)
    assert da == db and na == nb and a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_a_run_split_in_two_is_bit_identical_to_a_straight_one():
  """State and batch iterator handed over mid-epoch (as a checkpoint does) continue exactly."""
  data = _planted_sequences(users=120)
  settings = _settings(data, epochs=3, dim=8, batch_size=64, num_negatives=8)
  mesh = sharding.create_mesh({"data": -1})

  def run(split):
    trainer = build_trainer(data, settings, mesh=mesh)
    batches, state, start = trainer.batches(), trainer.init_state(), 0
    if split:
      first = loop.run_loop(loop.LoopSettings(total_steps=trainer.total_steps, steps_per_run=split),
                            state, trainer.step, batches, start=0, show_progress=False)
      host, saved = jax.device_get(first.state), batches.get_state()
      trainer = build_trainer(data, settings, mesh=mesh)
      batches = trainer.batches()
      batches.set_state(saved)
      state, start = jax.device_put(host, trainer.state_shardings), split
    return loop.run_loop(loop.LoopSettings(total_steps=trainer.total_steps), state, trainer.step,
                         batches, start=start, show_progress=False).state.params

  straight, split = run(0), run(5)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(split)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _frozen_config(data_dir, **overrides):
  return load_config("tiny", **{"encoder_mode": "frozen", "train_steps": 0,
                                "data.data_dir": str(data_dir), "hybrid.epochs": 6,
                                "checkpoint_every": 4, "log_every": 1, **overrides})


def _final_params(workdir):
  from crossrec_jax import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  manager = ckpt_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
  step = manager.all_steps()[-1]
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  params = manager.manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
  manager.close()
  return step, params


def test_steps_per_run_then_resume_matches_a_straight_run(tmp_path):
  straight = train.train_and_evaluate(_frozen_config(tmp_path / "tfds"), tmp_path / "straight")
  # The same cached text vectors (a fresh encode may differ in the last bit between processes).
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(tmp_path / "straight" / "text_cache", tmp_path / "split" / "text_cache")
  first = train.train_and_evaluate(_frozen_config(tmp_path / "tfds", steps_per_run=5), tmp_path / "split")
  assert first["step"] == 5 and not first["metrics"]
  rest = train.train_and_evaluate(_frozen_config(tmp_path / "tfds"), tmp_path / "split")
  assert rest["step"] == straight["step"]
  (sa, pa), (sb, pb) = _final_params(tmp_path / "straight"), _final_params(tmp_path / "split")
  assert sa == sb
  # Through Orbax and a new process the parameters agree to the last bits of float32 (the
  # in-process resume below is bit-exact).
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  flat = lambda r: loop.flat_metrics(r["metrics"])
  assert flat(rest).keys() == flat(straight).keys()
  np.testing.assert_allclose(list(flat(rest).values()), list(flat(straight).values()), rtol=1e-6)


def test_nan_loss_exits_without_a_checkpoint(tmp_path):
  config = _frozen_config(tmp_path / "tfds", **{"hybrid.learning_rate": 1e30, "checkpoint_every": 1})
  with pytest.raises(errors.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping without checkpointing"):
    train.train_and_evaluate(config, tmp_path / "run")
  checkpoints = tmp_path / "run" / "checkpoints"
  if checkpoints.exists() and [p for p in checkpoints.iterdir() if p.name.isdigit()]:
    _, params = _final_params(tmp_path / "run")  # what was saved before the blow-up is finite
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_sigterm_saves_and_exits_143_then_the_same_command_finishes(tmp_path):
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "crossrec_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
         f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.encoder_mode=frozen", "--config.train_steps=0", "--config.hybrid.epochs=3000",
         "--config.checkpoint_every=0", "--config.log_every=1"]
  log = tmp_path / "term.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline:
    if metrics.exists() and sum('"train"' in l for l in metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.1)
  assert proc.poll() is None, log.read_text()[-3000:]
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = log.read_text()
  assert proc.returncode == errors.EXIT_PREEMPTED, out[-3000:]
  step = int(out.split("SIGTERM received: saved step ")[1].split()[0])
  assert [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == [step]
  again = subprocess.run(cmd + ["--config.steps_per_run=2"], capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"checkpoints/{step}" in again.stdout and f"saved step {step + 2}" in again.stdout, again.stdout[-3000:]
