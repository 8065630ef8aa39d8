"""Training: sharding (8 forced CPU devices), optimizer options, checkpoints, resume, failures."""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import optim, sharding, steps, train
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
  run, params = train.build_run(config, workdir, devices)
  state = train.init_state(run, params)
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
  run, params = train.build_run(config, tmp_path)
  state = train.init_state(run, params)
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
  overrides = {"data.data_dir": data_dir, "mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"]}
  config8 = load_config(**overrides)
  losses8, state8, _, batches = _losses(config8, tmp_path / "a", jax.devices())
  config1 = load_config(**{"data.data_dir": data_dir, "mesh.data": 1, "mesh.fsdp": 1})
  losses1, state1, _, _ = _losses(config1, tmp_path / "b", jax.devices()[:1], batches)
  print(f"\n[mesh {mesh}] losses 8 devices {losses8} vs 1 device {losses1}")
  # Tolerance: reductions are split differently across devices (float32 reassociation).
  np.testing.assert_allclose(losses8, losses1, rtol=2e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_fresh_rating_head_predicts_the_train_mean(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir})
  run, params = train.build_run(config, tmp_path)
  rating_domains = [d for d, s in enumerate(run.model_config.domains) if s.task == "rating"]
  assert rating_domains
  state = train.init_state(run, params)
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
  run, params = train.build_run(config, tmp_path)
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
    run, params = train.build_run(config, tmp_path / str(frozen))
    state = train.init_state(run, params)
    tables = steps.TaskTables.from_config(run.model_config)
    step = steps.jit_train_step(steps.make_train_step(run.graphdef, run.tx, tables, config),
                                run.state_shardings, run.mesh)
    batch = sharding.host_batch_to_global(_batches(run, 1)[0], run.mesh)
    flops[frozen] = step.lower(state, batch).compile().cost_analysis()["flops"]
    norms[frozen] = float(step(state, batch)[1]["grad_norm"])
  assert norms[-1] < norms[0]
  assert flops[-1] < 0.8 * flops[0], flops


def test_parameter_efficient_mode_trains_only_matching(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir,
                          "optim.trainable_patterns": ("^head/", "_ids/", "layers/1/")})
  run, params = train.build_run(config, tmp_path)
  labels = jax.tree.leaves(optim.trainable_labels(params, config))
  assert labels.count("frozen") > labels.count("head") > 0


def test_gradient_accumulation_applies_every_k(tmp_path, data_dir):
  config = load_config(**{"data.data_dir": data_dir, "optim.accumulate_steps": 2})
  run, params = train.build_run(config, tmp_path)
  before = np.asarray(params["head"]["out_kernel"])
  _, state, _, _ = _losses(config, tmp_path, jax.devices(), n=1)
  np.testing.assert_array_equal(np.asarray(state.params["head"]["out_kernel"]), before)


def test_adversarial_step_changes_the_update(tmp_path, data_dir):
  base = {"data.data_dir": data_dir}
  plain, s0, _, batches = _losses(load_config(**base, **{"adversarial.method": "none"}), tmp_path / "a", jax.devices(), n=3)
  for method in ("fgm", "pgd", "smart"):
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

def _cli(workdir, data_dir, *flags, env=None):
  return [sys.executable, "-m", "crossrec_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *flags]


def _final_params(workdir):
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints",
                             item_names=("state", "data_iter", "meta")) as mgr:
    step = mgr.latest_step()
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored["state"]["params"]


def test_cli_trains_writes_artifacts_and_resumes(tmp_path, data_dir):
  workdir = tmp_path / "run"
  out = subprocess.run(_cli(workdir, data_dir), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "valid metrics" in out.stdout and "popularity" in out.stdout
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["step"] == 6 and "music" in lines[-1]["metrics"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "tokenizer" / "tokenizer.json").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
  again = subprocess.run(_cli(workdir, data_dir), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from checkpoint step 6" in again.stdout


def test_sigkill_after_checkpoint_then_resume_matches_straight_run(tmp_path, data_dir):
  flags = ["--config.train_steps=18", "--config.checkpoint_every=3"]
  straight = subprocess.run(_cli(tmp_path / "straight", data_dir, *flags), capture_output=True,
                            text=True, timeout=600)
  assert straight.returncode == 0, straight.stderr[-3000:]
  proc = subprocess.Popen(_cli(tmp_path / "killed", data_dir, *flags), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "killed" / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (ckpts / "3").is_dir():  # committed (orbax renames from a tmp name when done)
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  resumed = subprocess.run(_cli(tmp_path / "killed", data_dir, *flags), capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from checkpoint step" in resumed.stdout
  step_a, params_a = _final_params(tmp_path / "straight")
  step_b, params_b = _final_params(tmp_path / "killed")
  assert step_a == step_b == 18
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(_cli(workdir, data_dir, "--config.train_steps=400", "--config.checkpoint_every=200"),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (workdir / "tensorboard").exists():
    time.sleep(0.1)
  time.sleep(3)  # inside the training loop
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0
  assert "SIGTERM received: saved step" in stdout
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and 0 < max(saved) < 400


def test_nan_loss_stops_without_checkpoint(tmp_path, data_dir):
  workdir = tmp_path / "run"
  config = load_config(**{"data.data_dir": data_dir, "optim.learning_rate": 1e30,
                          "optim.clip_norm": 0.0, "optim.warmup_steps": 0, "checkpoint_every": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"loss is (nan|inf) at step \d+; stopping without checkpointing"):
    train.train_and_evaluate(config, workdir)
  saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  for step in saved:  # whatever was saved before the blow-up holds finite parameters
    _, params = _final_params(workdir)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_corrupt_latest_checkpoint_falls_back_and_incompatible_is_refused(tmp_path, data_dir, caplog):
  workdir = tmp_path / "run"
  out = subprocess.run(_cli(workdir, data_dir), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  # Corrupt every file of the latest checkpoint's train state.
  for f in (workdir / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"corrupted")
  config = load_config(**{"data.data_dir": data_dir})
  run, _ = train.build_run(config, workdir)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  with caplog.at_level("WARNING"):
    step, state, data_state, meta = checkpointer.restore(
        ckpt_lib.abstract_like(run.abstract_state, run.state_shardings), expected_meta=run.meta)
  assert step == 3 and data_state
  assert "trying the previous one" in caplog.text
  # A different model shape is refused with a clear error instead of training over it.
  other = load_config(**{"data.data_dir": data_dir, "model.dim": 48})
  with pytest.raises(ckpt_lib.CheckpointIncompatibleError, match=r"written for another model \(differs in \['dim'\]\).*new --workdir"):
    train.train_and_evaluate(other, workdir)
