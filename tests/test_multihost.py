"""Two local processes (4 CPU devices each) train through the same entry point as a pod would,
save to a shared directory, restart and resume; the losses match one 8-device process."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, data_dir, *flags):
  return [sys.executable, "-m", "crossrec_jax.train", f"--config={ROOT / 'configs' / 'tiny.py'}",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.train_steps=6",
          "--config.checkpoint_every=3", *flags]


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _port_taken(output):
  # jaxlib 0.10's coordinator (gRPC on [::]:port) reports a taken port only as "Failed to add
  # port to server: No address added" and then "Failed to start RPC server".
  return any(m in output for m in ("Address already in use", "address already in use",
                                   "Failed to bind", "failed to bind",
                                   "Failed to add port to server", "Failed to start RPC server"))


def _run_two_processes(workdir, data_dir, logs, *flags, exit_code=0, while_running=None,
                       timeout=600):
  """Both processes write to files, not pipes (a full pipe would block a process inside a
  collective while we wait on the other). ``while_running(procs, paths)`` acts on them once
  started (e.g. signals one); then both must end with ``exit_code`` within ``timeout`` s. The
  coordinator port is free when picked but could be taken before process 0 binds it: then the
  attempt is repeated on a new port."""
  for attempt in range(3):
    port = _free_port()
    paths = [pathlib.Path(logs) / f"attempt{attempt}_process{i}.log" for i in range(2)]
    procs = []
    failed = lambda: any(p.poll() not in (None, exit_code) for p in procs)
    try:
      for i, path in enumerate(paths):
        with open(path, "w") as f:
          procs.append(subprocess.Popen(_command(
              workdir, data_dir, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
              *flags), env=_env(4), stdout=f, stderr=subprocess.STDOUT))
      if while_running is not None:
        while_running(procs, paths)
      deadline = time.time() + timeout
      # One failed process (e.g. the port was taken) ends the attempt: the other would wait.
      while time.time() < deadline and any(p.poll() is None for p in procs) and not failed():
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    outputs = [path.read_text() for path in paths]
    if failed() and any(_port_taken(o) for o in outputs):
      continue
    for p, out in zip(procs, outputs):
      assert p.returncode == exit_code, out[-4000:]
    return outputs
  raise AssertionError(f"no free coordinator port after 3 attempts:\n{outputs[0][-2000:]}")


def _train_losses(workdir):
  lines = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {l["step"]: l["metrics"]["loss"] for l in lines if l["split"] == "train"}


def test_two_process_training_resumes_and_matches_one_process(tmp_path):
  data_dir = tmp_path / "tfds"
  multi = tmp_path / "multi"
  # Phase 1: both processes stop after 3 steps (checkpoint written jointly), phase 2 resumes.
  first = _run_two_processes(multi, data_dir, tmp_path, "--config.steps_per_run=3")
  assert "saved step 3" in first[0]
  second = _run_two_processes(multi, data_dir, tmp_path)
  assert "Resuming from checkpoint step 3" in second[0]
  single = tmp_path / "single"
  out = subprocess.run(_command(single, data_dir), env=_env(8), capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  losses_multi, losses_single = _train_losses(multi), _train_losses(single)
  print(f"\n[multi-host] 2 processes x 4 devices: {losses_multi}\n[multi-host] 1 process x 8 devices: {losses_single}")
  assert sorted(losses_multi) == sorted(losses_single) == [1, 2, 3, 4, 5, 6]
  # Same global batches and mesh shape; only the cross-process reduction order may differ.
  np.testing.assert_allclose([losses_multi[s] for s in range(1, 7)],
                             [losses_single[s] for s in range(1, 7)], rtol=1e-5)


def test_sigterm_to_one_process_saves_the_same_step_on_both_and_exits_143(tmp_path):
  """SIGTERM reaches one host only (as on a preempted pod worker): JAX's preemption service
  tells the other, both save the same step and exit 143 so the scheduler re-runs the job."""
  import signal
  workdir, data_dir = tmp_path / "run", tmp_path / "tfds"

  def sigterm_after_two_logged_steps(procs, paths):
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 400
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
      if any(p.poll() is not None for p in procs):
        return  # ended early (e.g. the port was taken): _run_two_processes says what happened
      assert time.time() < deadline, [path.read_text()[-3000:] for path in paths]
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # the non-primary host only

  outputs = _run_two_processes(
      workdir, data_dir, tmp_path, "--config.train_steps=100000", "--config.checkpoint_every=0",
      "--config.adversarial.method=none",  # half the compile time; same save path
      exit_code=143, while_running=sigterm_after_two_logged_steps, timeout=300)
  saved = [int(o.split("SIGTERM received: saved step ")[1].split()[0]) for o in outputs]
  assert saved[0] == saved[1], saved
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [saved[0]]


FROZEN = ("--config.encoder_mode=frozen", "--config.train_steps=0", "--config.hybrid.epochs=4",
          "--config.checkpoint_every=0")


def test_two_process_frozen_run_resumes_and_matches_one_process(tmp_path):
  """The frozen mode through the same loop: 2 processes x 4 devices stop after 5 steps
  (mid-epoch, saved jointly with the batch iterator's state), resume, and log the losses one
  8-device process logs."""
  data_dir, multi = tmp_path / "tfds", tmp_path / "multi"
  first = _run_two_processes(multi, data_dir, tmp_path, *FROZEN, "--config.steps_per_run=5")
  assert "saved step 5" in first[0], first[0][-3000:]
  second = _run_two_processes(multi, data_dir, tmp_path, *FROZEN)
  assert "Restored the frozen-mode model from" in second[0] and "test metrics" in second[0]
  single = tmp_path / "single"
  out = subprocess.run(_command(single, data_dir, *FROZEN), env=_env(8), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  losses_multi, losses_single = _train_losses(multi), _train_losses(single)
  print(f"\n[multi-host frozen] 2 x 4 devices: {losses_multi}\n[multi-host frozen] 1 x 8: {losses_single}")
  assert sorted(losses_multi) == sorted(losses_single) and len(losses_single) >= 10
  np.testing.assert_allclose([losses_multi[s] for s in sorted(losses_single)],
                             [losses_single[s] for s in sorted(losses_single)], rtol=1e-5)
