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

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import cli, config_check, errors, served, sharding
from crossrec_jax.data import pipeline
from crossrec_jax.evaluation import Evaluator, format_table
from crossrec_jax.experiment import build_run, init_state, maybe_initialize_distributed
from crossrec_jax.metric_writers import create_default_writer, flatten
from crossrec_jax.rundir import remove_if_failed_early
from crossrec_jax.training import loop, optim, steps, tune

log = logging.getLogger("crossrec_jax")


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has checkpoints), evaluates, returns the final metrics
  (``preempted: True`` when SIGTERM stopped it after saving). Every encoder mode trains through
  the one loop, ``training.loop.run_loop``."""
  config_check.validate_config(config)  # before any data is read or anything compiles
  workdir = config_check.check_workdir(workdir)
  maybe_initialize_distributed(config)
  with remove_if_failed_early(workdir) as progress:
    if config.encoder_mode == "frozen":
      return served.train_and_evaluate(config, workdir, progress)
    if config.encoder_mode == "tune":
      return tune.train_and_evaluate(config, workdir, progress)
    return _train_end_to_end(config, workdir, progress)


def _train_end_to_end(config, workdir, progress_marker) -> dict[str, Any]:
  if config.train_steps <= 0:
    raise errors.ConfigError("encoder_mode=end_to_end needs --config.train_steps > 0 (the frozen "
                             "and tune modes count epochs instead)")
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
  eval_split = config.data.eval_split if config.data.eval_split in run.sources else config.data.test_split
  limit = config.data.eval_limit or None
  writer = create_default_writer(workdir)  # writes nothing on processes other than 0

  def evaluate(state, step, split=eval_split) -> dict[str, dict[str, float]]:
    results = evaluator.evaluate(state.params, run.sources[split], limit=limit,
                                 baselines=run.baselines)
    writer.write_scalars(step, flatten(results, f"{split}/"))
    writer.flush()
    if is_main:
      print(f"\n[step {step}] {split} metrics (ours vs baseline):\n{format_table(results)}")
    return results

  class _Batches:  # the grain iterator, its batches placed on the mesh
    def __next__(self):
      return sharding.host_batch_to_global(next(iterator), run.mesh)

    get_state, set_state = iterator.get_state, iterator.set_state

  def mark(step):
    progress_marker.started = True

  start = int(sharding.to_host(state.step))
  try:
    result = loop.run_loop(
        loop.LoopSettings.from_config(config, config.train_steps), state, train_step,
        _Batches(), start=start, checkpointer=checkpointer, meta=run.meta, evaluate=evaluate,
        writer=writer, examples=lambda batch: config.batch_size,
        learning_rate=optim.learning_rate_schedule(config), on_step=mark, show_progress=is_main)
    state, step, last_results = result.state, result.step, result.last_results
    if result.finished and step >= config.train_steps:
      # The final state (also when re-run after the end): evaluated, saved, then test.
      last_results = evaluate(state, step)
      if step not in checkpointer.all_steps():
        checkpointer.save(step, state, iterator.get_state(), run.meta,
                          loop.flat_metrics(last_results) if config.best_metric else None)
      if config.data.test_split in run.sources and config.data.test_split != eval_split:
        last_results = evaluate(state, step, config.data.test_split)
  finally:
    checkpointer.close()
    writer.close()
  return {"step": step, "metrics": last_results, "preempted": result.preempted}


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
