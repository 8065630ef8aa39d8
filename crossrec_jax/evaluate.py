"""``python -m crossrec_jax.evaluate --workdir DIR [--split test]``: evaluates a training run's
latest checkpoint (per-domain metrics next to the baselines; see crossrec_jax/evaluation.py).
"""

from __future__ import annotations

from crossrec_jax.evaluation import Evaluator, format_table


def evaluate_workdir(workdir, split: str = "test", limit: int | None = None,
                     secret_file: str = "") -> dict[str, dict[str, float]]:
  """Evaluates the latest checkpoint of a training workdir on ``split`` (with baselines).

  Creates nothing: a mistyped workdir is an error, not a new empty run directory.
  """
  from crossrec_jax import config_defaults  # pylint: disable=import-outside-toplevel
  from crossrec_jax import checkpoint as ckpt_lib, config_check, experiment, rundir  # pylint: disable=import-outside-toplevel
  from crossrec_jax.serving import scorer as serving  # pylint: disable=import-outside-toplevel
  from crossrec_jax.errors import ConfigError, UsageError  # pylint: disable=import-outside-toplevel
  if limit is not None and limit < 0:
    raise UsageError(f"--limit {limit} must be >= 0 (0: the whole split)")
  workdir = config_check.check_workdir(workdir, must_exist=True)
  if not (workdir / "checkpoints").is_dir():
    raise ConfigError(f"--workdir {workdir}: no checkpoints/ inside, so not a training run (or "
                      "it never saved); pass the --workdir of a crossrec_jax.train run")
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    steps_ = checkpointer.all_steps()
    if not steps_:
      raise ConfigError(f"{workdir / 'checkpoints'}: no checkpoint to evaluate yet")
    meta = checkpointer.read_meta(steps_[-1])
    config = config_defaults.saved_config(meta["config"])
    # The training secret, checked against the checkpoint's digest: another one would silently
    # prepare a differently keyed copy of the data.
    secret = rundir.scoring_secret(meta, secret_file)
    if serving.encoder_mode(workdir, meta) in ("frozen", "tune"):
      return _evaluate_hybrid(workdir, config, secret, split)
    run, _ = experiment.build_run(config, workdir, secret=secret)
    if split not in run.sources:
      raise UsageError(f"--split {split!r} is not in the data set; it has "
                       f"{sorted(k for k in run.sources if k != 'items')}")
    # Evaluation needs the weights only: the optimizer state stays on disk.
    step, params, _, _ = checkpointer.restore(
        ckpt_lib.abstract_like(run.abstract_state.params, run.state_shardings.params),
        expected_meta=run.meta, params_only=True)
  finally:
    checkpointer.close()
  evaluator = Evaluator(run.graphdef, run.mesh, run.catalog, run.tokenizer, run.pipe_config,
                        run.model_config)
  baselines = run.baselines
  results = evaluator.evaluate(params, run.sources[split], limit=limit, baselines=baselines)
  print(f"[step {step}] {split} metrics (ours vs baseline):\n{format_table(results)}")
  return results


def _evaluate_hybrid(workdir, config, secret, split):
  """A frozen or tune run: its served (fused) model on ``split``, next to the same baselines as in
  training."""
  from crossrec_jax import served  # pylint: disable=import-outside-toplevel
  from crossrec_jax.training import tune
  from crossrec_jax.errors import UsageError  # pylint: disable=import-outside-toplevel
  model, data, step = tune.load(workdir, config, secret)  # the tune mode's model if it ran
  if not data.mask((split,)).any():
    raise UsageError(f"--split {split!r} has no rows in the data set; it has "
                     f"{sorted(set(data.split.tolist()) - {'history'})}")
  results = served.evaluate(model, data, split, config)
  print(f"[step {step}] {split} metrics (ours vs baseline):\n{format_table(results)}")
  return results


def _define_flags(fv, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  d = dict(flag_values=fv)
  flags.DEFINE_string("workdir", None, "The training run's --workdir.", **d)
  flags.DEFINE_string("split", "test", "Split to evaluate.", **d)
  flags.DEFINE_integer("limit", 0, "Examples to evaluate; 0: all.", **d)
  flags.DEFINE_string("link_secret_file", "", "File holding the training's user-linkage secret "
                      "(or set CROSSREC_LINK_SECRET).", **d)
  flags.mark_flags_as_required(["workdir"], flag_values=fv)


def _main(f) -> int:
  import json  # pylint: disable=import-outside-toplevel
  print(json.dumps(evaluate_workdir(f.workdir, f.split, f.limit or None, f.link_secret_file)))
  return 0


def cli_main(argv=None) -> int:
  """``python -m crossrec_jax.evaluate``; returns the exit code (see crossrec_jax/cli.py)."""
  from crossrec_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.run_absl(argv, _define_flags, _main)


if __name__ == "__main__":
  import sys as _sys  # pylint: disable=import-outside-toplevel
  from crossrec_jax import evaluate as _module  # pylint: disable=import-self
  _sys.exit(_module.cli_main())
