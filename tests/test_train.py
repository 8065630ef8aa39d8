"""Training: sharding (8 forced CPU devices), optimizer options, checkpoints, resume, failures."""

import importlib.util
import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import errors, experiment, sharding, train
from crossrec_jax.training import optim
from crossrec_jax.training import steps
from crossrec_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name="tiny", **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _batches(run, n):
  implicit = [i for i, d in enumerate(run.model_config.domains) if d.task == "implicit"]
  it = iter(pipeline.train_loader(run.sources["train"], run.catalog, run.tokenizer,
                                  run.pipe_config, implicit))
  return [next(it) for _ in range(n)]


def _losses(config, workdir, devices, batches=None, n=3):
  run, params = experiment.build_run(config, workdir, devices)
  state = experiment.init_state(run, params)
  tables = steps.TaskTables.from_config(run.model_config)
  step = steps.jit_train_step(steps.make_train_step(run.graphdef, run.tx, tables, config),
                              run.state_shardings, run.mesh)
  batches = batches or _batches(run, n)
  losses = []
  for b in batches:
    state, m = step(state, sharding.host_batch_to_global(b, run.mesh))
    losses.append(float(m["loss"]))
  return losses, state, run, batches


def test_eight_devices_are_visible():
  assert jax.device_count() == 8, "tests run with --xla_force_host_platform_device_count=8"


def test_fsdp_shards_params_and_optimizer_state(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir, "mesh.data": 1, "mesh.fsdp": 8})
  run, params = experiment.build_run(config, tmp_path)
  state = experiment.init_state(run, params)
  arrays = jax.tree.leaves((state.params, state.opt_state))
  total = sum(a.nbytes for a in arrays)
  per_device = {}
  for a in arrays:
    for shard in a.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  worst = max(per_device.values())
  print(f"\n[fsdp] total {total / 2**20:.2f} MiB, worst device {worst / 2**20:.3f} MiB "
        f"(ratio {worst / total:.4f}, ideal 0.125)")
  assert len(per_device) == 8
  assert worst <= total / 8 * 1.1  # "about 1/8": only tiny per-domain biases stay replicated
  for a in jax.tree.leaves(state.params):
    if a.size >= 4096:
      assert a.addressable_shards[0].data.size == a.size // 8, a.sharding
  # Adam moments follow their parameter's sharding.
  kernel = state.params["encoder"]["layers"][0]["intermediate"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)


@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4}])
def test_eight_device_losses_match_one_device(tmp_path, data_dir, mesh):
  """Under jit any sharding gives the same numbers, so equal losses alone cannot show that the
  work is split: also check that each device holds 1/8 of the batch rows in host order, that the
  step returns params and Adam moments with their declared shardings (not replicated), and
  that per-example predictions agree row by row."""
  overrides = {"data.data_dir": data_dir, "mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"]}
  config8 = load_config(**overrides)
  losses8, state8, run8, batches = _losses(config8, tmp_path / "a", jax.devices())
  config1 = load_config(**{"data.data_dir": data_dir, "mesh.data": 1, "mesh.fsdp": 1})
  losses1, state1, run1, _ = _losses(config1, tmp_path / "b", jax.devices()[:1], batches)
  print(f"\n[mesh {mesh}] losses 8 devices {losses8} vs 1 device {losses1}")
  # Tolerance: reductions are split differently across devices (float32 reassociation).
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # The batch is split over data x fsdp: 8 disjoint row blocks, in the host's row order.
  batch = sharding.host_batch_to_global(batches[0], run8.mesh)
  for key, value in batch.items():
    rows = sorted((s.index[0].start or 0, s.data.shape[0]) for s in value.addressable_shards)
    assert rows == [(i * config8.batch_size // 8, config8.batch_size // 8) for i in range(8)], (key, rows)
    np.testing.assert_array_equal(np.asarray(value), batches[0][key], err_msg=key)
  # The step keeps the declared (sharded) placement of params and optimizer state.
  for name in ("params", "opt_state"):
    got, want = getattr(state8, name), jax.tree.leaves(getattr(run8.state_shardings, name))
    for (path, a), sh in zip(jax.tree_util.tree_flatten_with_path(got)[0], want):
      assert a.sharding.is_equivalent_to(sh, a.ndim), \
          f"{name}{jax.tree_util.keystr(path)}: {a.sharding.spec} instead of {sh.spec}"
  if mesh["fsdp"] > 1:
    kernel = state8.params["encoder"]["layers"][0]["intermediate"]["kernel"]
    assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // mesh["fsdp"]
  # Per-example outputs of the sharded model, row by row, equal the single-device ones.
  predict = jax.jit(steps.make_encode_fns(run8.graphdef)[2])
  out8, out1 = predict(state8.params, batch), predict(state1.params, batches[0])
  for key in ("rating", "logit"):
    np.testing.assert_allclose(np.asarray(out8[key]), np.asarray(out1[key]), rtol=1e-4, atol=1e-5,
                               err_msg=key)


def test_fresh_rating_head_predicts_the_train_mean(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir})
  run, params = experiment.build_run(config, tmp_path)
  rating_domains = [d for d, s in enumerate(run.model_config.domains) if s.task == "rating"]
  assert rating_domains
  state = experiment.init_state(run, params)
  _, _, predict, _, _ = steps.make_encode_fns(run.graphdef)
  batch = _batches(run, 1)[0]
  for d in rating_domains:
    spec = run.model_config.domains[d]
    mean = run.baselines.domain_mean[d]
    assert spec.min_rating < mean < spec.max_rating
    rating = np.asarray(jax.jit(predict)(state.params, batch | {
        "domain": np.full_like(batch["domain"], d)})["rating"])
    # The untrained head scatters around its bias; the scale's midpoint would be off by more.
    assert abs(rating.mean() - mean) < 0.5 * abs(mean - (spec.min_rating + spec.max_rating) / 2) + 0.05
    low, high, b = spec.min_rating, spec.max_rating, float(np.asarray(state.params["head"]["out_bias"])[d, 0])
    np.testing.assert_allclose(low + (high - low) / (1 + np.exp(-b)), mean, rtol=1e-6)


def test_frozen_layers_do_not_move_and_decay_mask(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir, "optim.freeze_encoder_layers": 1})
  run, params = experiment.build_run(config, tmp_path)
  labels = optim.trainable_labels(params, config)
  assert labels["encoder"]["layers"][0]["query"]["kernel"] == "frozen"
  assert labels["encoder"]["layers"][1]["query"]["kernel"] == "encoder"
  assert labels["encoder"]["embeddings"]["word_embeddings"]["embedding"] == "frozen"
  assert labels["head"]["tower_kernel"] == "head"
  mask = optim.decay_mask(params, config)
  assert mask["encoder"]["layers"][0]["query"]["kernel"] is True
  assert mask["encoder"]["layers"][0]["query"]["bias"] is False
  assert mask["encoder"]["layers"][0]["output_layer_norm"]["scale"] is False
  assert mask["user_ids"]["embedding"] is False
  before = jax.tree.map(np.asarray, params)
  _, state, _, _ = _losses(config, tmp_path, jax.devices(), n=2)
  after = jax.tree.map(np.asarray, state.params)
  np.testing.assert_array_equal(after["encoder"]["layers"][0]["query"]["kernel"],
                                before["encoder"]["layers"][0]["query"]["kernel"])
  assert not np.array_equal(after["encoder"]["layers"][1]["query"]["kernel"],
                            before["encoder"]["layers"][1]["query"]["kernel"])


def test_frozen_encoder_is_left_out_of_the_backward_pass(tmp_path, data_dir):
  """A frozen parameter gets no gradient: it counts in neither grad_norm nor the clipping norm,
  and with the whole encoder frozen the compiled step does markedly less work."""
  norms, flops = {}, {}
  for frozen in (0, -1):
    config = load_config(**{"data.data_dir": data_dir, "adversarial.method": "none",
                            "optim.freeze_encoder_layers": frozen})
    run, params = experiment.build_run(config, tmp_path / str(frozen))
    state = experiment.init_state(run, params)
    tables = steps.TaskTables.from_config(run.model_config)
    step = steps.jit_train_step(steps.make_train_step(run.graphdef, run.tx, tables, config),
                                run.state_shardings, run.mesh)
    batch = sharding.host_batch_to_global(_batches(run, 1)[0], run.mesh)
    flops[frozen] = step.lower(state, batch).compile().cost_analysis()["flops"]
    norms[frozen] = float(step(state, batch)[1]["grad_norm"])
  assert norms[-1] < norms[0]
  assert flops[-1] < 0.8 * flops[0], flops


def test_parameter_efficient_mode_trains_only_matching(tmp_path, data_dir):
  """Two real steps: every parameter outside the patterns is bit-unchanged, every one inside
  moved (warmup 0, so the first step already has a learning rate)."""
  config = load_config(**{"data.data_dir": data_dir, "optim.warmup_steps": 0,
                          "optim.trainable_patterns": ("^head/", "_ids/", "layers/1/")})
  run, params = experiment.build_run(config, tmp_path, jax.devices()[:1])
  labels = optim.trainable_labels(params, config)
  flat_labels = jax.tree.leaves(labels)
  assert flat_labels.count("frozen") > flat_labels.count("head") > 0
  assert labels["encoder"]["layers"][1]["query"]["kernel"] == "encoder"
  assert labels["encoder"]["layers"][0]["query"]["kernel"] == "frozen"
  before = jax.tree.map(np.array, params)
  _, state, _, _ = _losses(config, tmp_path, jax.devices()[:1], n=2)
  after = jax.tree.map(np.asarray, state.params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
  for path, label, a, b in zip(paths, flat_labels, jax.tree.leaves(after), jax.tree.leaves(before)):
    if label == "frozen":
      np.testing.assert_array_equal(a, b, err_msg=f"frozen {path} moved")
    else:
      assert not np.array_equal(a, b), f"trainable {path} ({label}) did not move"


def test_gradient_accumulation_averages_k_batches_into_one_update(tmp_path, data_dir):
  """accumulate_steps=2 with warmup 0: the first micro-step leaves the parameters bit-unchanged
  (a plain step would move them: the learning rate is > 0 at step 0) and the second applies ONE
  update with the mean of both batches' gradients."""
  base = {"data.data_dir": data_dir, "optim.warmup_steps": 0, "adversarial.method": "none"}
  config = load_config(**base, **{"optim.accumulate_steps": 2})
  run, params = experiment.build_run(config, tmp_path, jax.devices()[:1])
  params0 = jax.tree.map(np.array, params)
  batches = _batches(run, 2)
  tables = steps.TaskTables.from_config(run.model_config)
  step = steps.jit_train_step(steps.make_train_step(run.graphdef, run.tx, tables, config),
                              run.state_shardings, run.mesh)
  state = experiment.init_state(run, params)
  state, _ = step(state, sharding.host_batch_to_global(batches[0], run.mesh))
  after_one = jax.tree.map(np.asarray, state.params)
  state, _ = step(state, sharding.host_batch_to_global(batches[1], run.mesh))
  after_two = jax.tree.map(np.asarray, state.params)
  # Each batch's gradient at the initial parameters, from the same step function (same dropout
  # keys): an optimizer that applies no update and keeps the gradient as its state.
  capture = optax.GradientTransformation(
      lambda p: jax.tree.map(jnp.zeros_like, p),
      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  grad_step = jax.jit(steps.make_train_step(run.graphdef, capture, tables, config))
  g_state = steps.new_train_state(params0, capture, config.seed)
  grads = []
  for b in batches:
    g_state, _ = grad_step(g_state, b)
    grads.append(g_state.opt_state)
  plain = optim.create_optimizer(load_config(**base), params0)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
  updates, _ = plain.update(mean, plain.init(params0), params0)
  expected = jax.tree.map(np.asarray, optax.apply_updates(params0, updates))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params0)[0]]
  for path, a, b in zip(paths, jax.tree.leaves(after_one), jax.tree.leaves(params0)):
    np.testing.assert_array_equal(a, b, err_msg=f"{path} moved after the first of 2 micro-steps")
  moved = 0
  for path, a, b, p in zip(paths, jax.tree.leaves(after_two), jax.tree.leaves(expected),
                           jax.tree.leaves(params0)):
    # Tolerance: the accumulated mean is a running mean (other float rounding than (a+b)/2);
    # an Adam step is ~1e-4 here, so a wrong update is off by orders of magnitude more.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=f"{path} after 2 micro-steps")
    moved += not np.array_equal(b, p)
  assert moved > len(paths) // 2, "one plain step on the mean gradient moves the parameters"


def test_adversarial_step_changes_the_update(tmp_path, data_dir):
  base = {"data.data_dir": data_dir}
  plain, s0, _, batches = _losses(load_config(**base, **{"adversarial.method": "none"}), tmp_path / "a", jax.devices(), n=3)
  # fgm (a perturbation of the embeddings) and smart (a KL term) are the two ways the step wires
  # a regularizer in; pgd's own arithmetic is pinned in test_adversarial.py.
  for method in ("fgm", "smart"):
    adv, s1, _, _ = _losses(load_config(**base, **{"adversarial.method": method}), tmp_path / method, jax.devices(), batches)
    assert adv[0] > plain[0], method  # the regularizer adds to the same first-batch loss
    assert not np.allclose(np.asarray(s0.params["head"]["tower_kernel"]),
                           np.asarray(s1.params["head"]["tower_kernel"]), rtol=0, atol=1e-7), method
  zero, s2, _, _ = _losses(load_config(**base, **{"adversarial.method": "fgm", "adversarial.eps": 0.0}),
                           tmp_path / "z", jax.devices(), batches)
  assert zero == plain
  for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- the entry point, end to end ------------------------------------------------------------------

try:  # the exit code of a run stopped by SIGTERM (0 before crossrec_jax.cli defined one)
  from crossrec_jax.errors import EXIT_PREEMPTED
except ImportError:
  EXIT_PREEMPTED = 0


def _cli(workdir, data_dir, *flags):
  return [sys.executable, "-m", "crossrec_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]


def _run(cmd):
  """Runs to the end: (exit code, stdout and stderr together)."""
  out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  return out.returncode, out.stdout


def _final_params(workdir):
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints",
                             item_names=("params", "state", "data_iter", "meta")) as mgr:
    step = mgr.latest_step()
    restored = mgr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  return step, restored["params"]


def _saved_steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _train_steps_logged(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")]
  return [l["step"] for l in lines if l["split"] == "train"]


def _start_and_wait_for_step(cmd, workdir, log, min_step, extra=lambda: True):
  """Starts the CLI and returns once it has logged train step >= ``min_step`` (inside the
  training loop: compiled and stepping) and ``extra()`` holds."""
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
  deadline = time.time() + 400
  while time.time() < deadline and proc.poll() is None:
    if max(_train_steps_logged(workdir), default=0) >= min_step and extra():
      return proc
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f"run ended (rc {proc.poll()}) before logging step {min_step}:\n"
                       f"{pathlib.Path(log).read_text()[-3000:]}")


def test_cli_trains_writes_artifacts_and_resumes_from_a_middle_step(tmp_path, data_dir):
  workdir = tmp_path / "run"
  rc, out = _run(_cli(workdir, data_dir, "--config.steps_per_run=3"))
  assert rc == 0, out[-3000:]
  assert "saved step 3" in out and _saved_steps(workdir) == [3]
  rc, out = _run(_cli(workdir, data_dir))
  assert rc == 0, out[-3000:]
  assert "Resuming from checkpoint step 3" in out
  assert "valid metrics" in out and "popularity" in out
  # Steps 4-6 continue the run: no step is trained twice, none is skipped.
  assert _train_steps_logged(workdir) == [1, 2, 3, 4, 5, 6]
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == 6 and "music" in lines[-1]["metrics"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "tokenizer" / "tokenizer.json").exists()
  assert _saved_steps(workdir) == [3, 6]


# 9 steps, checkpoints at 3, 6, 9, written asynchronously: the production default.
ASYNC_FLAGS = ("--config.train_steps=9", "--config.checkpoint_every=3",
               "--config.async_checkpointing=true")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
  """The uninterrupted run the interrupted ones must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("straight") / "run"
  rc, out = _run(_cli(workdir, data_dir, *ASYNC_FLAGS))
  assert rc == 0, out[-3000:]
  return _final_params(workdir)


def _assert_same_final_params(workdir, straight_run):
  step_a, params_a = straight_run
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == 9
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_with_async_checkpointing_then_resume_matches_straight_run(tmp_path, data_dir,
                                                                          straight_run):
  """kill -9 while training continues past an asynchronous checkpoint (a save may be in
  flight): the same command resumes from the last committed one and ends bit-identical to an
  uninterrupted run."""
  killed = tmp_path / "killed"
  proc = _start_and_wait_for_step(_cli(killed, data_dir, *ASYNC_FLAGS), killed,
                                  tmp_path / "killed.log", 4,
                                  lambda: (killed / "checkpoints" / "3").is_dir())
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  rc, out = _run(_cli(killed, data_dir, *ASYNC_FLAGS))
  assert rc == 0, out[-3000:]
  assert re.search(r"Resuming from checkpoint step [36]\b", out), out[-3000:]
  _assert_same_final_params(killed, straight_run)


def test_sigterm_mid_interval_saves_and_the_same_command_resumes_exactly(tmp_path, data_dir,
                                                                         straight_run):
  """SIGTERM inside the loop (right after the first logged step, so between checkpoint steps)
  saves that step and exits; the same command resumes from it and ends bit-identical to an
  uninterrupted run."""
  workdir = tmp_path / "run"
  proc = _start_and_wait_for_step(_cli(workdir, data_dir, *ASYNC_FLAGS), workdir,
                                  tmp_path / "term.log", 1)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  log = (tmp_path / "term.log").read_text()
  assert proc.returncode == EXIT_PREEMPTED, log[-3000:]
  saved = re.search(r"SIGTERM received: saved step (\d+)", log)
  assert saved, log[-3000:]
  step = int(saved.group(1))
  assert 1 <= step < 9 and max(_saved_steps(workdir)) == step
  rc, out = _run(_cli(workdir, data_dir, *ASYNC_FLAGS))
  assert rc == 0, out[-3000:]
  assert f"Resuming from checkpoint step {step}" in out
  _assert_same_final_params(workdir, straight_run)


@pytest.mark.parametrize("overrides", [
    {"checkpoint_every": 1},
    # steps_per_run stops at step 2, which is neither a log nor a checkpoint step.
    {"checkpoint_every": 0, "log_every": 100, "steps_per_run": 2},
], ids=["checkpoint_every_step", "steps_per_run_save"])
def test_nan_loss_stops_without_checkpoint(tmp_path, data_dir, overrides):
  workdir = tmp_path / "run"
  config = load_config(**{"data.data_dir": data_dir, "optim.learning_rate": 1e30,
                          "optim.clip_norm": 0.0, "optim.warmup_steps": 0,
                          "adversarial.method": "none", **overrides})  # none: a faster compile
  with pytest.raises(errors.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping without checkpointing"):
    train.train_and_evaluate(config, workdir)
  if "steps_per_run" in overrides:
    assert _saved_steps(workdir) == []
  elif _saved_steps(workdir):  # whatever was saved before the blow-up holds finite parameters
    _, params = _final_params(workdir)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_logged_train_loss_is_the_mean_over_the_logging_window(tmp_path, data_dir):
  overrides = {"data.data_dir": data_dir, "train_steps": 4, "log_every": 2,
               "checkpoint_every": 0, "adversarial.method": "none"}
  train.train_and_evaluate(load_config(**overrides), tmp_path / "run")
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  logged = {l["step"]: l for l in lines if l["split"] == "train"}
  assert sorted(logged) == [2, 4]
  # The same batches, one step at a time (same seed and data order as the run).
  per_step, _, _, _ = _losses(load_config(**overrides), tmp_path / "steps", jax.devices(), n=4)
  np.testing.assert_allclose([logged[2]["metrics"]["loss"], logged[4]["metrics"]["loss"]],
                             [np.mean(per_step[:2]), np.mean(per_step[2:])], rtol=1e-5)
  assert not np.isclose(per_step[0], per_step[1], rtol=1e-4)  # so the mean is not the last loss
  # Step 1 compiled: the first window's throughput is timed on step 2 alone.
  assert logged[2]["examples_per_second"] > 0 and logged[4]["examples_per_second"] > 0


def test_checkpointer_keeps_the_last_k_and_the_best(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "ckpt", keep=2, best_metric="music/ndcg@10",
                                       best_mode="max", async_save=False)
  state = {"w": np.zeros(3, np.float32)}
  for step, value in zip(range(1, 6), (0.1, 0.9, 0.2, 0.3, 0.4)):
    checkpointer.save(step, state, None, {"model": {}}, {"music/ndcg@10": value})
  checkpointer.close()
  assert checkpointer.all_steps() == [2, 4, 5]  # the best (step 2) and the latest 2


def test_best_mode_and_early_stopping_from_the_config():
  rating = load_config(best_metric="books/rmse", best_mode="max", early_stopping_patience=2)
  assert ckpt_lib.best_mode(rating) == "min"  # rating errors are minimised whatever best_mode says
  stopper = ckpt_lib.EarlyStopping.from_config(rating)
  assert [stopper.update({"books/rmse": v}) for v in (1.0, 0.8, 0.9, 0.8)] == [False] * 3 + [True]
  assert (stopper.best, stopper.evals_since_best) == (0.8, 2)  # a tie is no improvement
  ranking = ckpt_lib.EarlyStopping.from_config(load_config(best_metric="music/ndcg@10",
                                                           early_stopping_patience=2))
  assert [ranking.update({"music/ndcg@10": v}) for v in (0.1, 0.2, 0.1, 0.3)] == [False] * 4
  disabled = ckpt_lib.EarlyStopping.from_config(load_config(best_metric="music/ndcg@10"))
  assert not any(disabled.update({"music/ndcg@10": 0.1}) for _ in range(5))


def test_checkpointer_from_config_keeps_the_best_by_best_mode(tmp_path):
  config = load_config(best_metric="books/rmse", keep_checkpoints=1)  # rmse: the lowest is best
  checkpointer = ckpt_lib.Checkpointer.from_config(config, tmp_path / "ckpt")
  for step, value in zip(range(1, 5), (0.9, 0.2, 0.5, 0.7)):
    checkpointer.save(step, {"w": np.zeros(3, np.float32)}, None, {"model": {}}, {"books/rmse": value})
  checkpointer.close()
  assert checkpointer.all_steps() == [2, 4]


def test_training_stops_early_when_best_metric_stops_improving(tmp_path, data_dir, monkeypatch,
                                                                capsys):
  class ConstantEvaluator:  # every evaluation the same: no improvement after the first
    def __init__(self, *args):
      pass

    def evaluate(self, *args, **kwargs):
      return {"music": {"n": 8, "auc": 0.5, "hr@10": 0.5, "ndcg@10": 0.5}}

  monkeypatch.setattr(train, "Evaluator", ConstantEvaluator)
  config = load_config(**{"data.data_dir": data_dir, "eval_every": 1, "checkpoint_every": 0,
                          "best_metric": "music/ndcg@10", "early_stopping_patience": 2,
                          "adversarial.method": "none"})
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert result["step"] == 3  # evaluations at steps 1 (the best), 2 and 3
  assert "Early stopping at step 3: music/ndcg@10 has not improved for 2 evaluations" in (
      capsys.readouterr().out)
  assert max(_saved_steps(tmp_path / "run")) == 3  # the step it stopped at is saved


@pytest.fixture(scope="module")
def finished_run(tiny_run):
  """A finished 6-step run (checkpoints 3 and 6; the session's, from conftest.py), copied by
  the tests that damage it."""
  return tiny_run[0]


def _flip_bytes(path):
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data)):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["array_chunks", "array_metadata"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, data_dir, finished_run, damaged, caplog):
  """Either the array data alone (the OCDBT chunk files; every metadata file intact) or the
  state's metadata alone is damaged: the previous checkpoint is restored, with a warning."""
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  state_dir = workdir / "checkpoints" / "6" / "state"
  if damaged == "array_chunks":
    files = sorted((state_dir / "ocdbt.process_0" / "d").iterdir())
  else:
    files = [state_dir / "_METADATA"]
  assert files
  for f in files:
    _flip_bytes(f)
  config = load_config(**{"data.data_dir": data_dir})
  run, _ = experiment.build_run(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  with caplog.at_level("WARNING"):
    step, state, data_state, _ = checkpointer.restore(
        ckpt_lib.abstract_like(run.abstract_state, run.state_shardings), expected_meta=run.meta)
  checkpointer.close()
  assert step == 3 and data_state
  assert int(state.step) == 3
  assert "trying the previous one" in caplog.text


def test_incompatible_checkpoint_is_refused(tmp_path, data_dir, finished_run):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run, workdir)
  # A different model shape is refused with a clear error instead of training over it.
  other = load_config(**{"data.data_dir": data_dir, "model.dim": 48})
  with pytest.raises(ckpt_lib.CheckpointIncompatibleError, match=r"written for another model \(differs in \['dim'\]\).*new --workdir"):
    train.train_and_evaluate(other, workdir)
