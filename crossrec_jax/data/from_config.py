"""A run's inputs from its config: the prepared data set (one process prepares the tfds data
set, the others wait and read the finished one) and the encoder checkpoint directory."""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from crossrec_jax import data as data_lib
from crossrec_jax.data import link_secret
from crossrec_jax.models import hf, testing


def barrier(name):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def resolve_link_secret(config) -> link_secret.LinkSecret:
  """The run's user-linkage secret; every process must resolve the same one."""
  d = config.data
  secret = link_secret.resolve(d.source, d.path, configured=d.get("link_secret", ""),
                               configured_file=d.get("link_secret_file", ""))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    digests = multihost_utils.process_allgather(
        np.frombuffer(secret.digest.encode(), np.uint8))
    if len({bytes(row) for row in np.asarray(digests).reshape(jax.process_count(), -1)}) > 1:
      raise data_lib.DataError(
          f"the hosts resolved different user-linkage secrets (this one: {secret.origin}); set "
          f"{link_secret.ENV_SECRET} or data.link_secret_file to the same secret on every host")
  return secret


def secret_description(secret: link_secret.LinkSecret) -> dict[str, str]:
  """What a checkpoint records about the secret: never its value."""
  return {"digest": secret.digest, "origin": secret.origin, "file": secret.file}


def public_config_dict(config) -> dict:
  """``config.to_dict()`` without the linkage secret (for checkpoints and logs)."""
  out = config.to_dict()
  if out.get("data", {}).get("link_secret"):
    out["data"] = dict(out["data"], link_secret="")
  return out


def processing_config(config, secret: link_secret.LinkSecret | None = None
                      ) -> data_lib.ProcessingConfig:
  """``ProcessingConfig.from_config`` with the secret resolved from the config when not given."""
  return data_lib.ProcessingConfig.from_config(config, (secret or resolve_link_secret(config)).value)


def prepare_data(config, secret: link_secret.LinkSecret | None = None):
  d = config.data
  processing = processing_config(config, secret)
  synthetic = data_lib.SyntheticConfig.from_config(config)
  # Training evaluates on eval_split, else test_split: refuse data with neither at prepare.
  evaluated = tuple((split, key) for split, key in ((d.eval_split, "data.eval_split"),
                                                    (d.test_split, "data.test_split")) if split)
  kwargs = dict(data_dir=d.data_dir or None, bad_rows=d.bad_rows, processing=processing,
                require_any_of=evaluated,
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
