"""What a training run is: ``Run`` (mesh, model graph, tokenizer, catalog, data sources,
optimizer, shardings, checkpoint description, baselines) built from a config by ``build_run``,
its initial train state, and distributed start-up. Used by train and evaluate alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

from crossrec_jax import config_check
from crossrec_jax import data as data_lib
from crossrec_jax import rundir, sharding
from crossrec_jax.training import optim
from crossrec_jax.training import steps
from crossrec_jax.data import pipeline
from crossrec_jax.data.from_config import (prepare_data, public_config_dict, resolve_link_secret,
                                          resolve_model_checkpoint, secret_description)
from crossrec_jax.evaluation import Baselines
from crossrec_jax.models import CrossDomainRecommender, DomainSpec, RecommenderConfig, heads, hf


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
  model = CrossDomainRecommender.from_pretrained(
      str(model_dir), domains=domains, seed=config.seed,
      **RecommenderConfig.options_from_config(config))
  graphdef, params_state = nnx.split(model, nnx.Param)
  logical = sharding.logical_axes_tree(params_state)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(params_state))

  tokenizer = hf.load_tokenizer(model_dir)
  if jax.process_index() == 0 and not (workdir / rundir.TOKENIZER_DIR).exists():
    rundir.save_tokenizer(tokenizer, workdir / rundir.TOKENIZER_DIR)  # self-contained for inference

  mesh = sharding.create_mesh(dict(config.mesh), devices)
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} must be a multiple of the {mesh.devices.size} devices")
  sources = builder.as_data_source()
  pipe_config = pipeline.PipelineConfig.from_config(config)
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
  baselines = Baselines(catalog, counts, label_sums)
  _start_ratings_at_train_mean(params, model.config, baselines)
  if jax.process_index() == 0 and not (workdir / rundir.KNOWN_IDS_FILE).exists():
    known_items = [f"{catalog.domains[d]}/{i}" for d, i, c in
                   zip(catalog.domain, catalog.item_ids, counts) if c > 0]
    rundir.write_known_ids(workdir, sorted(train_users), known_items)

  tx = optim.create_optimizer(config, params)
  abstract_state = steps.abstract_train_state(params, tx)
  shardings_ = steps.state_shardings(abstract_state, logical, tx, tuple(config.sharding_rules), mesh)
  meta = json.loads(json.dumps({
      "config": public_config_dict(config), "model": model.config.to_dict(),
      "tokenizer": "tokenizer", "bert_checkpoint": str(model_dir), "data": md,
      "link_secret": secret_description(secret),
  }, default=list))
  run = Run(config, workdir, mesh, graphdef, model.config, tokenizer, catalog, sources,
            pipe_config, tx, shardings_, abstract_state, meta, baselines)
  return run, params


def _start_ratings_at_train_mean(params, model_config, baselines) -> None:
  """Sets each rating domain's output bias so that a fresh model predicts its train mean."""
  bias = params["head"]["out_bias"] = np.array(params["head"]["out_bias"])  # writable copy
  for d, spec in enumerate(model_config.domains):
    if spec.task == "rating":
      bias[d, 0] = heads.rating_bias_for_mean(baselines.domain_mean[d], spec.min_rating,
                                              spec.max_rating)


def init_state(run: Run, params) -> steps.TrainState:
  """The run's initial train state from host ``params`` (as ``build_run`` returns them)."""
  return steps.create_train_state(params, run.tx, run.state_shardings, seed=run.config.seed)
