"""Where a run's numbers go: ``metrics.jsonl`` and TensorBoard (process 0 only), the train
metrics of a logging window (averaged on device) and the console progress bar.

The writers have the shape of ``clu.metric_writers`` (``write_scalars(step, {name: value})``,
``flush``, ``close``), so swapping in clu's is a small change. Names are ``SPLIT/NAME`` or
``SPLIT/DOMAIN/METRIC``; each ``write_scalars`` call appends one metrics.jsonl record per split:

    {"step": 6, "split": "train", "metrics": {"loss": ...}, "learning_rate": ..., "examples_per_second": ...}
    {"step": 6, "split": "valid", "metrics": {"music": {"ndcg@10": ..., "n": 40}, ...}}
"""

from __future__ import annotations

import sys
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from crossrec_jax.rundir import METRICS_FILE, append_jsonl

TENSORBOARD_DIR = "tensorboard"
# Fields of the record itself (beside "metrics"): they describe the run, not the model.
RECORD_FIELDS = ("learning_rate", "examples_per_second")


class MetricWriter:
  """The ``clu.metric_writers.MetricWriter`` interface; this base writes nothing (what every
  process but 0 gets, so callers need no ``if process_index() == 0``)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class JsonlWriter(MetricWriter):
  """One JSON record per split and call, appended to ``path`` (values kept as they are: the
  evaluator's counts stay integers)."""

  def __init__(self, path):
    self.path = epath.Path(path)

  def write_scalars(self, step, scalars):
    records: dict[str, dict] = {}
    for name, value in scalars.items():
      split, _, key = name.partition("/")
      record = records.setdefault(split, {"step": step, "split": split, "metrics": {}})
      value = value.item() if hasattr(value, "item") else value  # numpy / device scalars
      if key in RECORD_FIELDS:
        record[key] = value
      elif "/" in key:  # DOMAIN/METRIC; rpartition: a domain name may itself hold a "/"
        domain, _, metric = key.rpartition("/")
        record["metrics"].setdefault(domain, {})[metric] = value
      else:
        record["metrics"][key] = value
    for record in records.values():
      append_jsonl(self.path, record)


class TensorBoardWriter(MetricWriter):
  """tensorboardX events in ``logdir``, opened at the first write (no empty event file for a
  run that fails before logging anything)."""

  def __init__(self, logdir):
    self.logdir, self._writer = str(logdir), None

  def write_scalars(self, step, scalars):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._writer = SummaryWriter(self.logdir)
    for name, value in scalars.items():
      self._writer.add_scalar(name.replace("@", "_at_"), float(value), step)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None


class MultiWriter(MetricWriter):

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


def create_default_writer(workdir, tensorboard: bool = True) -> MetricWriter:
  """``workdir/metrics.jsonl`` (+ ``workdir/tensorboard/``) on process 0, nothing elsewhere."""
  if jax.process_index() != 0:
    return MetricWriter()
  workdir = epath.Path(workdir)
  writers = [JsonlWriter(workdir / METRICS_FILE)]
  if tensorboard:
    writers.append(TensorBoardWriter(workdir / TENSORBOARD_DIR))
  return MultiWriter(writers)


def flatten(results: Mapping[str, Mapping[str, Any]], prefix: str = "") -> dict[str, Any]:
  """``{domain: {metric: value}}`` -> ``{"PREFIXdomain/metric": value}``."""
  return {f"{prefix}{name}/{k}": v for name, m in results.items() for k, v in m.items()}


@jax.jit
def _accumulate(total, metrics):
  return jax.tree.map(lambda t, m: t + m.astype(jnp.float32), total, metrics)


def _local(x):
  # A replicated global array of a multi-host run: this process's copy is the whole value.
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x.addressable_data(0)
  return x


class TrainWindow:
  """The train metrics of the steps since the last log, summed on device (no host sync per
  step), and their examples/s timed from ``restart_clock`` (called after the compile step and
  after each log, evaluation and save, so those are never counted)."""

  def __init__(self):
    self.total, self.steps, self.examples, self.t0 = None, 0, 0, None

  def add(self, metrics: Mapping[str, jax.Array], examples: int) -> None:
    self.total = (jax.tree.map(lambda m: m.astype(jnp.float32), dict(metrics))
                  if self.total is None else _accumulate(self.total, dict(metrics)))
    self.steps += 1
    self.examples += examples

  def restart_clock(self) -> None:
    self.examples, self.t0 = 0, time.perf_counter()

  def read(self) -> tuple[dict[str, float], float | None]:
    """(the mean of each metric over the window, examples/s or None when no timed step ran:
    the window held only the compile step); one device-to-host transfer; empties the window."""
    total = jax.device_get(jax.tree.map(_local, self.total))  # waits for the window's steps
    rate = None
    if self.examples and self.t0 is not None:
      rate = self.examples / max(time.perf_counter() - self.t0, 1e-9)
    means = {k: float(np.asarray(v)) / self.steps for k, v in total.items()}
    self.total, self.steps = None, 0
    return means, rate


def progress_bar(start: int, total: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled,
              dynamic_ncols=True, file=sys.stdout)
