"""A run's inputs from its config: the prepared data set (one process prepares the tfds data
set, the others wait and read the finished one) and the encoder checkpoint directory."""

from __future__ import annotations

import pathlib

import jax

from crossrec_jax import data as data_lib
from crossrec_jax.models import hf, testing


def barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def processing_config(config) -> data_lib.ProcessingConfig:
  d = config.data
  return data_lib.ProcessingConfig(
      link_secret=d.link_secret, mapping_file=d.mapping_file, split=d.split, ratio=tuple(d.ratio),
      seed=config.seed, max_profile_items=d.max_profile_items,
      max_items_per_domain=d.max_items_per_domain, max_profile_words=d.max_profile_words,
      domains=tuple(d.domains))


def prepare_data(config):
  d = config.data
  processing = processing_config(config)
  synthetic = data_lib.SyntheticConfig(num_users=d.synthetic_users,
                                       items_per_domain=d.items_per_domain, seed=config.seed)
  kwargs = dict(data_dir=d.data_dir or None, bad_rows=d.bad_rows, processing=processing,
                synthetic_config=synthetic)
  # One process prepares; the others wait and then read the finished data set.
  if jax.process_index() == 0:
    builder = data_lib.prepare(d.source, d.path, **kwargs)
  barrier("prepare_data")
  if jax.process_index() != 0:
    builder = data_lib.prepare(d.source, d.path, **kwargs)
  return builder


def resolve_model_checkpoint(config, workdir: pathlib.Path) -> pathlib.Path:
  name = config.model.checkpoint
  if name.startswith("generated:tiny"):
    # A random tiny BERT written as a real checkpoint (tests, smoke runs): same loading path.
    target = workdir / "generated_bert"
    if not (target / "model.safetensors").exists() and jax.process_index() == 0:
      testing.write_tiny_checkpoint(target, seed=config.seed,
                                    extra_words=data_lib.synthetic.vocabulary_words())
    barrier("generated_bert")
    return target
  return hf.resolve_checkpoint(name)
