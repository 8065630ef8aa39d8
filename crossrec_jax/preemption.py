"""SIGTERM -> every process saves at the same step, then the run returns ``preempted``."""

from __future__ import annotations

import signal

import jax


class Preemption:
  """Several processes: JAX's preemption service (started by ``jax.distributed.initialize``)
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
