"""Training: ``train_and_evaluate(config, workdir)`` and ``python -m crossrec_jax.train``.

python -m crossrec_jax.train --config configs/demo.py --workdir runs/demo [--config.key=value]

Re-running the same command resumes from the latest checkpoint in ``workdir``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import jax
import numpy as np

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import cli, errors, config_check, sharding
from crossrec_jax.training import optim
from crossrec_jax.training import steps
from crossrec_jax.errors import NonFiniteLossError  # noqa: F401 (public here: the run's own error)
from crossrec_jax.data import pipeline
from crossrec_jax.data.from_config import prepare_data  # noqa: F401 (used via train.prepare_data)
from crossrec_jax.evaluation import Evaluator, format_table
# What a run is lives in experiment.py; these names stay importable from here.
from crossrec_jax.experiment import (Run, build_run, init_state,  # noqa: F401
                                     maybe_initialize_distributed)
from crossrec_jax.metric_writers import TrainWindow, create_default_writer, flatten, progress_bar
from crossrec_jax.preemption import Preemption
from crossrec_jax.rundir import remove_if_failed_early

log = logging.getLogger("crossrec_jax")


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has checkpoints), evaluates, returns the final metrics
  (``preempted: True`` when SIGTERM stopped it after saving)."""
  config_check.validate_config(config)  # before any data is read or anything compiles
  workdir = config_check.check_workdir(workdir)
  maybe_initialize_distributed(config)
  with remove_if_failed_early(workdir) as progress:
    if config.encoder_mode == "frozen":
      from crossrec_jax import served  # pylint: disable=import-outside-toplevel
      return served.train_and_evaluate(config, workdir)
    if config.encoder_mode == "tune":
      from crossrec_jax.training import tune  # pylint: disable=import-outside-toplevel
      return tune.train_and_evaluate(config, workdir)
    return _train_end_to_end(config, workdir, progress)


def _train_end_to_end(config, workdir, progress_marker) -> dict[str, Any]:
  run, params = build_run(config, workdir)
  workdir = run.workdir
  is_main = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer.from_config(config, workdir / "checkpoints")
  restored = checkpointer.restore(ckpt_lib.abstract_like(run.abstract_state, run.state_shardings),
                                  expected_meta=run.meta)
  implicit = [i for i, d in enumerate(run.model_config.domains) if d.task == "implicit"]
  iterator = iter(pipeline.train_loader(run.sources["train"], run.catalog, run.tokenizer,
                                        run.pipe_config, implicit))
  if restored is not None:
    step0, state, data_state, _ = restored
    if data_state:
      iterator.set_state(data_state)
    log.info("resumed from %s at step %d", checkpointer.directory, step0)
    print(f"Resuming from checkpoint step {step0} in {checkpointer.directory}")
  else:
    state = init_state(run, params)
  del params

  tables = steps.TaskTables.from_config(run.model_config, dict(config.loss.domain_weights))
  train_step = steps.jit_train_step(steps.make_train_step(run.graphdef, run.tx, tables, config),
                                    run.state_shardings, run.mesh)
  evaluator = Evaluator(run.graphdef, run.mesh, run.catalog, run.tokenizer,
                                 run.pipe_config, run.model_config)
  baselines = run.baselines
  eval_split = config.data.eval_split if config.data.eval_split in run.sources else config.data.test_split
  limit = config.data.eval_limit or None
  writer = create_default_writer(workdir)  # writes nothing on processes other than 0
  schedule = optim.learning_rate_schedule(config)
  preemption = Preemption(checkpointer)
  preempted = False

  def save(step, metrics=None):
    checkpointer.save(step, state, iterator.get_state(), run.meta, metrics)

  def evaluate(step, split) -> dict[str, dict[str, float]]:
    results = evaluator.evaluate(state.params, run.sources[split], limit=limit, baselines=baselines)
    writer.write_scalars(step, flatten(results, f"{split}/"))
    writer.flush()
    if is_main:
      print(f"\n[step {step}] {split} metrics (ours vs baseline):\n{format_table(results)}")
    return results

  def log_train(step):
    """The window's mean metrics; every process checks the loss, so no NaN state is saved."""
    means, rate = window.read()
    if not np.isfinite(means["loss"]):
      raise NonFiniteLossError(
          f"loss is {means['loss']} at step {step}; stopping without checkpointing it (a step "
          f"since the last log had a non-finite loss). The last good checkpoint in "
          f"{checkpointer.directory} is kept. Lower optim.learning_rate, enable "
          "optim.clip_norm, or check the data.")
    scalars = {f"train/{k}": v for k, v in means.items()}
    scalars["train/learning_rate"] = float(schedule(step - 1))
    if rate is not None:  # None: the window held only the compile step
      scalars["train/examples_per_second"] = rate
    writer.write_scalars(step, scalars)
    progress.set_postfix(loss=f"{means['loss']:.4f}", **({"ex_s": f"{rate:.1f}"} if rate else {}))

  start = int(sharding.to_host(state.step))
  early_stopping, last_results = ckpt_lib.EarlyStopping.from_config(config), {}
  progress = progress_bar(start, config.train_steps, is_main)
  window = TrainWindow()
  step = start
  try:
    while step < config.train_steps:
      batch = sharding.host_batch_to_global(next(iterator), run.mesh)
      state, metrics = train_step(state, batch)
      step += 1
      progress_marker.started = True
      window.add(metrics, config.batch_size)
      if step == start + 1:  # compiled and run: the clock starts after it
        jax.block_until_ready(metrics)
        window.restart_clock()
      progress.update(1)
      preempted = preemption.reached(step)  # every process, every step (multi-host sync)
      at_checkpoint = config.checkpoint_every and step % config.checkpoint_every == 0
      at_eval = config.eval_every and step % config.eval_every == 0 and step < config.train_steps
      at_stop = (config.steps_per_run and step - start >= config.steps_per_run
                 and step < config.train_steps)
      # Every step that saves is a log step: its window's losses are checked first.
      if not (step % config.log_every == 0 or at_checkpoint or at_eval or at_stop or preempted
              or step == config.train_steps):
        continue
      log_train(step)
      if preempted:
        save(step)
        checkpointer.wait()
        print(f"\nSIGTERM received: saved step {step} to {checkpointer.directory}; exiting "
              f"with code {errors.EXIT_PREEMPTED} so the job is re-run (the same command resumes).",
              flush=True)
        break
      if at_stop:
        save(step)
        print(f"\nRan steps_per_run={config.steps_per_run} steps: saved step {step}; run the same "
              "command again to continue.")
        break
      eval_metrics = None
      if at_eval:
        last_results = evaluate(step, eval_split)
        eval_metrics = _flatten(last_results)
        if early_stopping.update(eval_metrics):
          print(f"\nEarly stopping at step {step}: {config.best_metric} has not improved "
                f"for {early_stopping.evals_since_best} evaluations "
                f"(best {early_stopping.best:.4f}).")
          save(step, eval_metrics)
          break
      if at_checkpoint or at_eval:
        save(step, eval_metrics if config.best_metric else None)
      window.restart_clock()  # logging, evaluation and saving are not training time
    else:  # reached train_steps (also when re-run after the end: evaluates the final state)
      last_results = evaluate(step, eval_split)
      if step not in checkpointer.all_steps():
        save(step, _flatten(last_results) if config.best_metric else None)
      if config.data.test_split in run.sources and config.data.test_split != eval_split:
        last_results = evaluate(step, config.data.test_split)
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
  return {"step": step, "metrics": last_results, "preempted": preempted}


def _flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """``{"domain/metric": value}``: what ``best_metric`` names and checkpoints record."""
  return {k: float(v) for k, v in flatten(results).items()}


def _main(fv) -> int:
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  # Orbax / tfds log every save at INFO through absl: keep the console to the progress bar.
  absl_logging.set_verbosity(absl_logging.INFO if os.environ.get("CROSSREC_VERBOSE") else absl_logging.WARNING)
  result = train_and_evaluate(fv.config, fv.workdir)
  if jax.process_index() == 0:
    print(json.dumps({"final_step": result["step"]}))
  return errors.EXIT_PREEMPTED if result.get("preempted") else 0


def _define_flags(fv, argv):
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                  lock_config=True, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard events.",
                      flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def cli_main(argv=None) -> int:
  """``python -m crossrec_jax.train``; returns the exit code (see crossrec_jax/cli.py)."""
  return cli.run_absl(argv, _define_flags, _main)


if __name__ == "__main__":
  # Through the imported module, not __main__'s copy: its exception classes are the ones
  # crossrec_jax.cli recognises as user errors.
  from crossrec_jax import train as _module  # pylint: disable=import-self
  sys.exit(_module.cli_main())
