"""The tune mode (``config.encoder_mode = "tune"``): the encoder trained under the frozen mode's
hybrid model, with the one adversarial objective (fgm / pgd) on the re-encoded texts."""

import functools
import json

import numpy as np
import pytest

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

  # No frozen run yet: it is trained first. Zero tune epochs serve exactly the frozen model:
  # re-encoding with the untouched encoder gives the cached vectors back.
  untouched = train.train_and_evaluate(config(0), run)
  out = capsys.readouterr().out
  assert "training the frozen mode first" in out
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
  assert f"Resuming the tune mode at step {tuned['step']}" in capsys.readouterr().out
  assert longer["step"] == 2 * tuned["step"] > 0
  saved = sorted(int(p.name) for p in (run / "tune" / "checkpoints").iterdir() if p.name.isdigit())
  assert saved[-1] == longer["step"], saved
  assert _records(run / "tune" / "metrics.jsonl")[-1] == longer["metrics"]

  # evaluate and score serve the tune-mode model of the workdir, exactly as it was evaluated.
  from crossrec_jax import evaluate  # pylint: disable=import-outside-toplevel
  _assert_metrics_close(evaluate.evaluate_workdir(run, "test"), longer["metrics"], atol=1e-5)
  assert tune.has_tuned(run)
  _scores_the_frozen_run(config(2), tmp_path)


def test_gs_workdir_stays_a_bucket_url_in_frozen_and_tune(monkeypatch, tmp_path):
  """``gs://bucket/run`` stays a bucket URL through the frozen mode (train, load) and the tune mode (its
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
  monkeypatch.setattr(served, "resolve_link_secret", lambda config: types.SimpleNamespace(
      digest="d", origin="test", file=""))
  monkeypatch.setattr(served, "prepare_data", lambda config, secret: None)
  monkeypatch.setattr(served, "InteractionData",
                      types.SimpleNamespace(from_builder=lambda builder: data))
  monkeypatch.setattr(served, "resolve_model_checkpoint", model_checkpoint)
  monkeypatch.setattr(served, "HybridSettings",
                      types.SimpleNamespace(from_config=lambda config, data: Settings()))
  class FakeTrainer:  # the hybrid trainer and the loop: what train_and_evaluate asks of them
    total_steps = 1

    def batches(self):
      return types.SimpleNamespace(get_state=lambda: b"{}", set_state=lambda state: None)

    def abstract_state(self):
      return types.SimpleNamespace(params={"w": np.zeros(1, np.float32)})

    init_state = abstract_state

    def schedule(self, step):
      return 0.0

    def step(self, state, batch):
      return state, {}

    def fitted(self, params):
      return types.SimpleNamespace()

  data.mask = lambda splits: np.zeros(1, bool)
  monkeypatch.setattr(served, "trainer_for", lambda *a, **k: FakeTrainer())
  monkeypatch.setattr(served.loop, "run_loop", lambda settings, state, *a, **k:
                      served.loop.LoopResult(state, 1, finished=True))
  monkeypatch.setattr(served, "evaluate_and_report",
                      lambda model, data, step, workdir, label, config=None:
                      calls["metrics"].append(str(workdir)))
  config = ml_collections.ConfigDict({
      "data": {"item_max_length": 8, "eval_split": "valid"}, "text_cache": "",
      "eval": {"cold_item_max_train": 2}, "fusion": {"cold_item_terms": False},
      "keep_checkpoints": 1, "best_metric": "", "best_mode": "max", "async_checkpointing": False,
      "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "steps_per_run": 0,
      "early_stopping_patience": 0})

  ops = ("open", "copy", "rename", "exists", "glob", "walk", "isdir", "listdir", "makedirs",
         "mkdir", "remove", "replace", "rmtree", "stat")
  with epath_testing.mock_epath(**{op: redirect for op in ops}):
    served.train_and_evaluate(config, "gs://bucket/run")  # the default (frozen-mode) training
    assert seen == ["gs://bucket/run/checkpoints"], seen
    assert calls == {"encoder": ["gs://bucket/run"], "metrics": ["gs://bucket/run"]}, calls
    assert len(list((store / "bucket" / "run" / "text_cache").glob("*.npy"))) == 1

    (store / "bucket" / "run" / "tune" / "checkpoints").mkdir(parents=True)
    assert not tune.has_tuned("gs://bucket/run")  # an empty tune-mode checkpoint folder
    assert seen[-1] == "gs://bucket/run/tune/checkpoints", seen
    with pytest.raises(ckpt_lib.CheckpointIncompatibleError,
                       match="^gs://bucket/run: no finished frozen-mode checkpoint"):
      tune.load("gs://bucket/run", config)       # no tune-mode model: the frozen one, via served.load
    assert seen[-1] == "gs://bucket/run/checkpoints" and calls["encoder"][-1] == "gs://bucket/run"

    vectors = np.arange(6, dtype=np.float32).reshape(2, 3)
    tune._write_vectors(epath.Path("gs://bucket/run"), vectors)  # pylint: disable=protected-access
    assert (store / "bucket" / "run" / "tune" / tune.VECTORS_FILE).is_file()
    np.testing.assert_array_equal(
        tune._read_vectors(epath.Path("gs://bucket/run"), 2), vectors)  # pylint: disable=protected-access
  assert not (tmp_path / "gs:").exists()  # nothing went to a collapsed local gs:/bucket path


# -- the tune mode's objective: L + w * L_adv on the re-encoded texts' word embeddings ------------

def _tune_parts(method, weight=0.5, eps=0.5):
  """A tiny encoder, a stand-in hybrid loss over the text table (squared error of a linear score
  of the batch items' text rows, plus a penalty) and the tune objective built on them."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from crossrec_jax.models import testing  # pylint: disable=import-outside-toplevel
  from crossrec_jax.models.bert import BertEncoder  # pylint: disable=import-outside-toplevel

  cfg = testing.tiny_bert_config(40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)
  graphdef, encoder_params = nnx.split(BertEncoder(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  num_items = 4
  table = jnp.asarray(rng.normal(size=(num_items + 1, 16)).astype(np.float32))
  norm = {"mean": jnp.zeros(16), "projection": jnp.eye(16), "scale": jnp.asarray(0.5)}
  rows = np.array([0, 2, num_items + 1], np.int32)  # the last: padding, dropped by the scatter
  mask = np.ones((3, 6), np.int32)
  mask[1, 4:] = 0
  mask[2] = 0
  tokens = {"rows": rows, "ids": rng.integers(5, 40, (3, 6)).astype(np.int32), "mask": mask}
  batch = {"item": np.array([0, 2, 1], np.int32), "label": np.array([1.0, -1.0, 0.5], np.float32)}

  def hybrid_loss(p, batch, text, tables):
    del tables
    data_loss = jnp.mean(jnp.square(text[batch["item"]] @ p["w"] - batch["label"]))
    reg = 0.01 * jnp.sum(p["w"] ** 2)
    return data_loss, (data_loss, reg)

  params = {"encoder": encoder_params, "hybrid": {"w": jnp.asarray(rng.normal(size=16), jnp.float32)}}
  adv = ml_collections.ConfigDict(dict(method=method, eps=eps, weight=weight, step_size=0.3,
                                       steps=3, noise=1e-3))
  objective = tune._objective(hybrid_loss, graphdef, norm, adv)  # pylint: disable=protected-access
  objective = functools.partial(objective, tables={"text": table})
  return objective, params, batch, tokens, jax.random.key(3), (hybrid_loss, graphdef, norm, table)


def test_tune_weight_zero_is_the_plain_step_exactly():
  import jax  # pylint: disable=import-outside-toplevel
  plain, params, batch, tokens, key, _ = _tune_parts("none")
  zero, *_ = _tune_parts("pgd", weight=0.0)
  (v0, m0), g0 = jax.value_and_grad(plain, has_aux=True)(params, batch, tokens, key)
  (v1, m1), g1 = jax.value_and_grad(zero, has_aux=True)(params, batch, tokens, key)
  assert float(v0) == float(v1) and set(m0) == set(m1) == {"loss", "reg"}
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tune_fgm_gradient_is_that_of_loss_plus_w_times_the_adversarial_loss():
  """By hand: L = data loss + penalty, L_adv = data loss with the FGM perturbation (held fixed)
  added to the re-encoded texts' word embeddings."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from crossrec_jax.training import adversarial  # pylint: disable=import-outside-toplevel
  w = 0.5
  objective, params, batch, tokens, key, (hybrid_loss, graphdef, norm, table) = _tune_parts("fgm", w)

  def data_loss(p, e):
    text = tune._live_text(graphdef, p["encoder"], tokens, norm, table, e)  # pylint: disable=protected-access
    return hybrid_loss(p["hybrid"], batch, text, None)

  embeds_of = lambda p: nnx.merge(graphdef, p["encoder"]).embed_tokens(tokens["ids"])
  r = adversarial.fgm_perturbation(lambda e: (data_loss(params, e)[0], None), embeds_of(params), 0.5)

  def by_hand(p):
    e = embeds_of(p)
    loss, (_, reg) = data_loss(p, e)
    return loss + reg + w * data_loss(p, adversarial.perturb(e, r))[0]

  (v, metrics), g = jax.value_and_grad(objective, has_aux=True)(params, batch, tokens, key)
  v0, g0 = jax.value_and_grad(by_hand)(params)
  np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)
  assert float(metrics["adversarial"]) > float(metrics["loss"])
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_tune_pgd_is_not_fgm():
  """method=pgd runs PGD (K projected steps from a random start), not FGM under another name."""
  import jax  # pylint: disable=import-outside-toplevel
  out = {}
  for method in ("fgm", "pgd"):
    objective, params, batch, tokens, key, _ = _tune_parts(method)
    (v, metrics), g = jax.value_and_grad(objective, has_aux=True)(params, batch, tokens, key)
    out[method] = (float(metrics["adversarial"]), np.asarray(g["hybrid"]["w"]))
  assert out["fgm"][0] != pytest.approx(out["pgd"][0], rel=1e-4), out
  assert not np.allclose(out["fgm"][1], out["pgd"][1], rtol=1e-4)


def test_tune_step_updates_with_pgd_under_jit():
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from crossrec_jax.training.steps import TrainState  # pylint: disable=import-outside-toplevel
  objective, params, batch, tokens, key, (_, _, _, table) = _tune_parts("pgd")
  ft = type("Tune", (), {"learning_rate": 1e-2, "encoder_learning_rate": 1e-3})
  tx = tune._optimizer(ft, 10)  # pylint: disable=protected-access
  step = tune._make_step(lambda p, b, t, k, tables: objective(p, b, t, k), tx)  # pylint: disable=protected-access
  before = np.asarray(params["hybrid"]["w"]).copy()
  state = TrainState(step=jnp.zeros((), jnp.int32), params=jax.tree.map(lambda x: x.copy(), params),
                     opt_state=tx.init(params), rng=jax.random.key_data(key))
  for _ in range(2):  # step 0 is the warmup's first (learning rate 0)
    state, metrics = step(state, batch, tokens, {"text": table})
  assert int(state.step) == 2
  assert set(metrics) == {"loss", "reg", "adversarial"}
  assert np.isfinite(float(metrics["adversarial"]))
  assert not np.array_equal(np.asarray(state.params["hybrid"]["w"]), before)


def test_nan_loss_in_tune_mode_stops_without_a_tune_checkpoint(tmp_path):
  """As in every mode: a non-finite loss raises NonFiniteLossError (the CLI exits 3) and the
  tune mode writes no checkpoint of it."""
  from crossrec_jax import errors  # pylint: disable=import-outside-toplevel
  from test_train import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("tiny", **{
      "encoder_mode": "tune", "data.data_dir": str(tmp_path / "tfds"), "tune.epochs": 2,
      "tune.batch_size": 64, "tune.refresh_items": 16, "tune.learning_rate": 1e30,
      "tune.encoder_learning_rate": 1e30})
  with pytest.raises(errors.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping without"):
    train.train_and_evaluate(config, tmp_path / "run")
  tuned = tmp_path / "run" / "tune" / "checkpoints"
  assert not tuned.exists() or not [p for p in tuned.iterdir() if p.name.isdigit()]


def test_sigterm_in_tune_mode_saves_and_exits_143_then_the_same_command_goes_on(tmp_path):
  """The tune mode runs on the one loop: SIGTERM saves its state (with the batch iterator's) and
  exits 143; the same command resumes from that step (here for steps_per_run more)."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  from crossrec_jax import errors  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parents[1]
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "crossrec_jax.train", f"--config={root / 'configs' / 'tiny.py'}",
         f"--workdir={workdir}", f"--config.data.data_dir={tmp_path / 'tfds'}",
         "--config.encoder_mode=tune", "--config.tune.epochs=500", "--config.tune.batch_size=64",
         "--config.tune.refresh_items=16", "--config.checkpoint_every=0", "--config.eval_every=0",
         "--config.log_every=1"]
  log = tmp_path / "term.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
  metrics = workdir / "tune" / "metrics.jsonl"
  deadline = time.time() + 500  # a busy machine: the frozen run comes first
  while proc.poll() is None and time.time() < deadline:
    if metrics.exists() and sum('"train"' in l for l in metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  assert proc.poll() is None, log.read_text()[-3000:]
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  out = log.read_text()
  assert proc.returncode == errors.EXIT_PREEMPTED, out[-3000:]
  step = int(out.split("SIGTERM received: saved step ")[1].split()[0])
  saved = [int(p.name) for p in (workdir / "tune" / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved == [step], saved
  again = subprocess.run(cmd + ["--config.steps_per_run=2"], capture_output=True, text=True,
                         timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (f"Resuming the tune mode at step {step}" in again.stdout
          and f"saved step {step + 2}" in again.stdout), again.stdout[-3000:]
