"""Training: ``train_and_evaluate(config, workdir)`` and ``python -m crossrec_jax.train``.

python -m crossrec_jax.train --config configs/demo.py --workdir runs/demo [--config.key=value]

Re-running the same command resumes from the latest checkpoint in ``workdir``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import cli, config_check
from crossrec_jax import data as data_lib
from crossrec_jax import evaluate as eval_lib
from crossrec_jax import optim, sharding, steps
from crossrec_jax import score as score_lib
from crossrec_jax.data import pipeline
from crossrec_jax.data.from_config import (barrier, prepare_data, processing_config,  # noqa: F401
                                          public_config_dict, resolve_link_secret,
                                          resolve_model_checkpoint, secret_description)
from crossrec_jax.models import CrossDomainRecommender, DomainSpec, heads, hf, testing

log = logging.getLogger("crossrec_jax")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN / inf; the run stops and nothing from it is checkpointed."""


def maybe_initialize_distributed(config) -> None:
  """``jax.distributed.initialize`` when several processes are configured (or on TPU pods)."""
  d = config.distributed
  address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num = int(d.num_processes or os.environ.get("JAX_NUM_PROCESSES", 0) or 0)
  pid = int(d.process_id if d.process_id >= 0 else os.environ.get("JAX_PROCESS_ID", -1))
  if jax.distributed.is_initialized():
    return
  if address and num > 1:
    jax.distributed.initialize(address, num_processes=num, process_id=pid)
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # TPU pod slice: everything comes from the environment


def _flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
  return {f"{name}/{k}": float(v) for name, m in results.items() for k, v in m.items()}


class _Preemption:
  """SIGTERM -> every process saves at the same step, then the run returns ``preempted``.

  Several processes: JAX's preemption service (started by ``jax.distributed.initialize``)
  catches SIGTERM on any host and Orbax's ``reached_preemption(step)`` turns true on all hosts
  at the same step, so no host is left stepping into a collective save alone. One process: a
  Python handler sets a flag (not installed in multi-process runs: it would replace JAX's).
  """

  def __init__(self, checkpointer):
    self.checkpointer, self.flag = checkpointer, False
    self.multi = jax.process_count() > 1
    if not self.multi:
      try:
        signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread (e.g. some notebook runners)
        pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.flag = True

  def reached(self, step: int) -> bool:
    """Called once per step by every process."""
    if self.multi:
      return self.checkpointer.reached_preemption(step)
    return self.flag


@dataclasses.dataclass
class Run:
  """Everything a training run builds from its config (also used by tests and notebooks)."""
  config: Any
  workdir: epath.Path
  mesh: Any
  graphdef: Any
  model_config: Any
  tokenizer: Any
  catalog: Any
  sources: Any
  pipe_config: Any
  tx: Any
  state_shardings: Any
  abstract_state: Any
  meta: dict
  baselines: Any


def build_run(config, workdir, devices=None, secret=None) -> tuple[Run, Any]:
  """Returns (run, initial params as numpy host arrays); ``devices`` defaults to all;
  ``secret``: the user-linkage secret (default: resolved from the config and environment)."""
  workdir = config_check.check_workdir(workdir)
  secret = secret or resolve_link_secret(config)
  builder = prepare_data(config, secret)
  md = data_lib.metadata(builder)
  if config.best_metric:  # the data's domains are known now, before anything compiles
    config_check.check_best_metric(config.best_metric, md["domains"])
  workdir.mkdir(parents=True, exist_ok=True)
  model_dir = resolve_model_checkpoint(config, workdir)
  domains = tuple(DomainSpec(**d) for d in md["domains"])
  m = config.model
  model = CrossDomainRecommender.from_pretrained(
      str(model_dir), domains=domains, seed=config.seed, dim=m.dim, pooling=m.pooling,
      user_buckets=m.user_buckets, item_buckets=m.item_buckets, tower_dim=m.tower_dim,
      retrieval_dim=m.retrieval_dim, num_experts=m.num_experts, tied_init=m.tied_init,
      dtype=m.dtype)
  graphdef, params_state = nnx.split(model, nnx.Param)
  logical = sharding.logical_axes_tree(params_state)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(params_state))

  tokenizer = hf.load_tokenizer(model_dir)
  if jax.process_index() == 0 and not (workdir / "tokenizer").exists():
    _save_tokenizer(tokenizer, workdir / "tokenizer")  # self-contained for inference

  mesh = sharding.create_mesh(dict(config.mesh), devices)
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {mesh.devices.size} devices")
  sources = builder.as_data_source()
  pipe_config = pipeline.PipelineConfig(
      batch_size=config.batch_size, user_max_length=config.data.user_max_length,
      item_max_length=config.data.item_max_length, num_negatives=config.data.num_negatives,
      user_buckets=m.user_buckets, item_buckets=m.item_buckets, seed=config.seed)
  catalog = pipeline.Catalog(sources["items"], [d.name for d in domains], tokenizer, pipe_config)

  # One pass over the train split: known IDs, item popularity (logQ) and the baselines.
  train_src = sources["train"]
  train_users, counts = set(), np.zeros(len(catalog), np.float64)
  label_sums = np.zeros(len(catalog), np.float64)
  for i in range(len(train_src)):
    record = train_src[i]
    train_users.add(data_lib.builder.decode_text(record["user_key"]))
    row = catalog.row[(data_lib.builder.decode_text(record["domain"]),
                       data_lib.builder.decode_text(record["item_id"]))]
    counts[row] += 1
    label_sums[row] += float(record["label"])
  catalog.set_train_counts(counts)
  baselines = eval_lib.Baselines(catalog, counts, label_sums)
  _start_ratings_at_train_mean(params, model.config, baselines)
  if jax.process_index() == 0 and not (workdir / score_lib.KNOWN_IDS_FILE).exists():
    known_items = [f"{catalog.domains[d]}/{i}" for d, i, c in
                   zip(catalog.domain, catalog.item_ids, counts) if c > 0]
    score_lib.write_known_ids(workdir, sorted(train_users), known_items)

  tx = optim.create_optimizer(config, params)
  abstract_state = jax.eval_shape(lambda p: steps.TrainState(
      jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0)), params)
  shardings_ = steps.state_shardings(abstract_state, logical, tx, tuple(config.sharding_rules), mesh)
  meta = json.loads(json.dumps({
      "config": public_config_dict(config), "model": model.config.to_dict(),
      "tokenizer": "tokenizer", "bert_checkpoint": str(model_dir), "data": md,
      "link_secret": secret_description(secret),
  }, default=list))
  run = Run(config, workdir, mesh, graphdef, model.config, tokenizer, catalog, sources,
            pipe_config, tx, shardings_, abstract_state, meta, baselines)
  return run, params


def _save_tokenizer(tokenizer, target: epath.Path) -> None:
  """``save_pretrained`` writes local files only: a bucket workdir gets a copy of them."""
  if "://" not in str(target):
    tokenizer.save_pretrained(str(target))
    return
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    target.mkdir(parents=True, exist_ok=True)
    for f in epath.Path(tmp).iterdir():
      f.copy(target / f.name, overwrite=True)


def append_jsonl(path: epath.Path, record: dict) -> None:
  """One JSON line; object stores have no append, so a bucket file is rewritten (it is small)."""
  line = json.dumps(record) + "\n"
  if "://" not in str(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(line)
  else:
    path.write_text((path.read_text() if path.exists() else "") + line)


@contextlib.contextmanager
def remove_if_failed_early(workdir):
  """A workdir this run created is removed if the run fails before its first step (yielded
  ``progress.started`` still False) and before writing a checkpoint, a metrics line or the
  stage-1 text cache: no half-built workdir (e.g. only a tokenizer) is left behind."""
  path = epath.Path(workdir)
  created = not path.exists()
  progress = types.SimpleNamespace(started=False)
  try:
    yield progress
  except BaseException:
    kept = ("checkpoints", "metrics.jsonl", "text_cache")
    if created and not progress.started and jax.process_index() == 0 and path.exists() and not any(
        (path / k).exists() for k in kept):
      if "://" in str(path):
        path.rmtree()
      else:
        shutil.rmtree(path, ignore_errors=True)
    raise


def _start_ratings_at_train_mean(params, model_config, baselines) -> None:
  """Sets each rating domain's output bias so that a fresh model predicts its train mean."""
  bias = params["head"]["out_bias"] = np.array(params["head"]["out_bias"])  # writable copy
  for d, spec in enumerate(model_config.domains):
    if spec.task == "rating":
      bias[d, 0] = heads.rating_bias_for_mean(baselines.domain_mean[d], spec.min_rating,
                                              spec.max_rating)


def init_state(run: Run, params) -> steps.TrainState:
  global_params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: x[idx]),
      params, run.state_shardings.params)
  rng = jax.random.PRNGKey(run.config.seed)

  def init(p):
    return steps.TrainState(jnp.zeros((), jnp.int32), p, run.tx.init(p), rng)

  return jax.jit(init, out_shardings=run.state_shardings)(global_params)


def train_and_evaluate(config, workdir) -> dict[str, Any]:
  """Trains (resuming if ``workdir`` has checkpoints), evaluates, returns the final metrics
  (``preempted: True`` when SIGTERM stopped it after saving)."""
  config_check.validate_config(config)  # before any data is read or anything compiles
  workdir = config_check.check_workdir(workdir)
  maybe_initialize_distributed(config)
  with remove_if_failed_early(workdir) as progress:
    if config.stage == "cached":
      from crossrec_jax import stage1_run  # pylint: disable=import-outside-toplevel
      return stage1_run.train_and_evaluate(config, workdir)
    return _train_end_to_end(config, workdir, progress)


def _train_end_to_end(config, workdir, progress_marker) -> dict[str, Any]:
  run, params = build_run(config, workdir)
  workdir = run.workdir
  is_main = jax.process_index() == 0
  best_mode = config.best_mode
  if config.best_metric.split("/")[-1] in ("rmse", "mae"):
    best_mode = "min"
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints,
                                       best_metric=config.best_metric, best_mode=best_mode,
                                       async_save=config.async_checkpointing)
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
  evaluator = eval_lib.Evaluator(run.graphdef, run.mesh, run.catalog, run.tokenizer,
                                 run.pipe_config, run.model_config)
  baselines = run.baselines
  eval_split = config.data.eval_split if config.data.eval_split in run.sources else config.data.test_split
  limit = config.data.eval_limit or None
  writer = _summary_writer(workdir) if is_main else None
  schedule = optim.learning_rate_schedule(config)
  preemption = _Preemption(checkpointer)
  preempted = False

  def save(step, metrics=None):
    checkpointer.save(step, state, iterator.get_state(), run.meta, metrics)

  def evaluate(step, split) -> dict[str, dict[str, float]]:
    results = evaluator.evaluate(state.params, run.sources[split], limit=limit, baselines=baselines)
    if is_main:
      append_jsonl(workdir / "metrics.jsonl", {"step": step, "split": split, "metrics": results})
      if writer is not None:
        for key, value in _flatten(results).items():
          writer.add_scalar(f"{split}/{key}".replace("@", "_at_"), value, step)
        writer.flush()
      print(f"\n[step {step}] {split} metrics (ours vs baseline):\n{eval_lib.format_table(results)}")
    return results

  start = int(sharding.to_host(state.step))
  best, evals_since_best, last_results = None, 0, {}
  progress = _progress(start, config.train_steps, is_main)
  t0, examples = time.time(), 0
  step = start
  try:
    while step < config.train_steps:
      batch = sharding.host_batch_to_global(next(iterator), run.mesh)
      state, metrics = train_step(state, batch)
      step += 1
      progress_marker.started = True
      examples += config.batch_size
      progress.update(1)
      preempted = preemption.reached(step)  # every process, every step (multi-host sync)
      at_checkpoint = config.checkpoint_every and step % config.checkpoint_every == 0
      at_eval = config.eval_every and step % config.eval_every == 0 and step < config.train_steps
      if step % config.log_every == 0 or at_checkpoint or at_eval or step == config.train_steps \
          or preempted:
        metrics = {k: float(sharding.to_host(v)) for k, v in metrics.items()}
        if not np.isfinite(metrics["loss"]):
          raise NonFiniteLossError(
              f"loss is {metrics['loss']} at step {step}; stopping without checkpointing it. "
              f"The last good checkpoint in {checkpointer.directory} is kept. Lower "
              "optim.learning_rate, enable optim.clip_norm, or check the data.")
        rate = examples / max(time.time() - t0, 1e-9)
        if writer is not None:
          for key, value in metrics.items():
            writer.add_scalar(f"train/{key}", float(value), step)
          writer.add_scalar("train/learning_rate", float(schedule(step - 1)), step)
          writer.add_scalar("train/examples_per_second", rate, step)
        progress.set_postfix(loss=f"{float(metrics['loss']):.4f}", ex_s=f"{rate:.1f}")
        if is_main:
          append_jsonl(workdir / "metrics.jsonl", {
              "step": step, "split": "train", "metrics": metrics,
              "learning_rate": float(schedule(step - 1)), "examples_per_second": rate})
      if preempted:
        save(step)
        checkpointer.wait()
        print(f"\nSIGTERM received: saved step {step} to {checkpointer.directory}; exiting "
              f"with code {cli.EXIT_PREEMPTED} so the job is re-run (the same command resumes).",
              flush=True)
        break
      if config.steps_per_run and step - start >= config.steps_per_run and step < config.train_steps:
        # This step may be no log step, so its loss has not been checked yet: never save NaN.
        loss = float(sharding.to_host(metrics["loss"]))
        if not np.isfinite(loss):
          raise NonFiniteLossError(
              f"loss is {loss} at step {step}; stopping without checkpointing it. The last good "
              f"checkpoint in {checkpointer.directory} is kept. Lower optim.learning_rate, "
              "enable optim.clip_norm, or check the data.")
        save(step)
        print(f"\nRan steps_per_run={config.steps_per_run} steps: saved step {step}; run the same "
              "command again to continue.")
        break
      eval_metrics = None
      if at_eval:
        last_results = evaluate(step, eval_split)
        eval_metrics = _flatten(last_results)
        if config.best_metric and config.early_stopping_patience:
          value = eval_metrics.get(config.best_metric)
          better = best is None or (value < best if best_mode == "min" else value > best)
          best, evals_since_best = (value, 0) if better else (best, evals_since_best + 1)
          if evals_since_best >= config.early_stopping_patience:
            print(f"\nEarly stopping at step {step}: {config.best_metric} has not improved "
                  f"for {evals_since_best} evaluations (best {best:.4f}).")
            save(step, eval_metrics)
            break
      if at_checkpoint or at_eval:
        save(step, eval_metrics if config.best_metric else None)
    else:  # reached train_steps (also when re-run after the end: evaluates the final state)
      last_results = evaluate(step, eval_split)
      if step not in checkpointer.all_steps():
        save(step, _flatten(last_results) if config.best_metric else None)
      if config.data.test_split in run.sources and config.data.test_split != eval_split:
        last_results = evaluate(step, config.data.test_split)
  finally:
    progress.close()
    checkpointer.close()
    if writer is not None:
      writer.close()
  return {"step": step, "metrics": last_results, "preempted": preempted}


def _progress(start, total, enabled):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
              dynamic_ncols=True, file=sys.stdout)


def _summary_writer(workdir):
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  return SummaryWriter(str(workdir / "tensorboard"))


def _main(fv) -> int:
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  # Orbax / tfds log every save at INFO through absl: keep the console to the progress bar.
  absl_logging.set_verbosity(absl_logging.INFO if os.environ.get("CROSSREC_VERBOSE") else absl_logging.WARNING)
  result = train_and_evaluate(fv.config, fv.workdir)
  if jax.process_index() == 0:
    print(json.dumps({"final_step": result["step"]}))
  return cli.EXIT_PREEMPTED if result.get("preempted") else 0


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
