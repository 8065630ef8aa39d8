"""Readers, validation, linkage, splits, profiles, tfds builders and the grain input pipeline."""

from crossrec_jax.data.builder import SourceConfig, load_and_process, metadata, prepare
from crossrec_jax.data.processing import ProcessingConfig
from crossrec_jax.data.records import DataError
from crossrec_jax.data.synthetic import SyntheticConfig

__all__ = ["SourceConfig", "load_and_process", "metadata", "prepare", "ProcessingConfig",
           "DataError", "SyntheticConfig"]
