"""The one training loop, shared by every encoder mode (frozen, tune, end_to_end).

``run_loop`` steps a jitted ``step_fn(state, batch) -> (state, metrics)`` over a resumable batch
iterator and owns everything around the step: the averaged train window and its finite-loss
check (a NaN / inf loss raises ``NonFiniteLossError`` before anything from that window is saved,
so the CLI exits 3 with no NaN checkpoint), periodic evaluation, best-by-metric and early
stopping, periodic checkpoints (state + the iterator's state, so a resume is exact),
``steps_per_run`` and SIGTERM (save, then ``preempted``: the CLI exits 143). The modes differ
only in their state, batches, step and evaluation, which they hand in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import numpy as np

from crossrec_jax import checkpoint as ckpt_lib
from crossrec_jax import errors
from crossrec_jax.metric_writers import MetricWriter, TrainWindow, flatten, progress_bar
from crossrec_jax.preemption import Preemption


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """When the loop logs, evaluates, saves and stops (steps; 0 disables)."""
  total_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  steps_per_run: int = 0
  best_metric: str = ""
  best_mode: str = "max"
  patience: int = 0

  @classmethod
  def from_config(cls, config, total_steps: int) -> "LoopSettings":
    return cls(total_steps=total_steps, log_every=max(1, config.log_every),
               eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
               steps_per_run=config.steps_per_run, best_metric=config.best_metric,
               best_mode=ckpt_lib.best_mode(config), patience=config.early_stopping_patience)


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  finished: bool            # reached total_steps (or stopped early): the caller's final phase runs
  preempted: bool = False
  last_results: dict = dataclasses.field(default_factory=dict)


class ResumableIterator(Iterator):
  """What the loop needs of the batches: ``next`` and a JSON-able state (bytes)."""

  def get_state(self) -> bytes: ...

  def set_state(self, state: bytes) -> None: ...


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """``{"domain/metric": value}``: what ``best_metric`` names and checkpoints record."""
  return {k: float(v) for k, v in flatten(results).items()}


def run_loop(settings: LoopSettings, state, step_fn: Callable, batches, *, start: int,
             checkpointer: ckpt_lib.Checkpointer | None = None,
             meta: Callable[[], dict] | dict | None = None,
             evaluate: Callable[[Any, int], dict] | None = None,
             writer: MetricWriter | None = None,
             examples: Callable[[Any], int] = lambda batch: 1,
             learning_rate: Callable[[int], float] | None = None,
             on_log: Callable[[int, dict], None] | None = None,
             on_step: Callable[[int], None] | None = None,
             show_progress: bool = True) -> LoopResult:
  """Steps from ``start`` to ``settings.total_steps``. ``batches`` yields what ``step_fn``
  takes; ``examples(batch)`` counts a batch's examples for the throughput; ``evaluate(state,
  step)`` returns ``{domain: {metric: value}}`` (mid-run evaluations, for ``best_metric`` and
  early stopping). Without a ``checkpointer`` nothing is saved and SIGTERM is not handled."""
  s = settings
  is_main = jax.process_index() == 0
  preemption = Preemption(checkpointer) if checkpointer is not None else None
  early = ckpt_lib.EarlyStopping(s.best_metric, s.patience, s.best_mode)
  meta_of = meta if callable(meta) else (lambda: meta or {})
  window = TrainWindow()
  progress = progress_bar(start, s.total_steps, is_main and show_progress)
  step, last_results = start, {}

  def save(step, metrics=None):
    if checkpointer is not None:
      checkpointer.save(step, state, batches.get_state(), meta_of(), metrics)

  def log_train(step):
    """The window's mean metrics; every process checks the loss, so no NaN state is saved."""
    means, rate = window.read()
    if not np.isfinite(means["loss"]):
      where = f"; the last good checkpoint in {checkpointer.directory} is kept" if checkpointer else ""
      raise errors.NonFiniteLossError(
          f"loss is {means['loss']} at step {step}; stopping without checkpointing it (a step "
          f"since the last log had a non-finite loss){where}. Lower the learning rate "
          "(optim.learning_rate / hybrid.learning_rate), enable optim.clip_norm, or check the data.")
    scalars = {f"train/{k}": v for k, v in means.items()}
    if learning_rate is not None:
      scalars["train/learning_rate"] = float(learning_rate(step - 1))
    if rate is not None:  # None: the window held only the compile step
      scalars["train/examples_per_second"] = rate
    if writer is not None:
      writer.write_scalars(step, scalars)
    if on_log is not None:
      on_log(step, scalars)
    progress.set_postfix(loss=f"{means['loss']:.4f}", **({"ex_s": f"{rate:.1f}"} if rate else {}))

  try:
    while step < s.total_steps:
      batch = next(batches)
      state, metrics = step_fn(state, batch)
      step += 1
      if on_step is not None:
        on_step(step)
      window.add(metrics, examples(batch))
      if step == start + 1:  # compiled and run: the clock starts after it
        jax.block_until_ready(metrics)
        window.restart_clock()
      progress.update(1)
      preempted = preemption is not None and preemption.reached(step)  # every process, every step
      # The last step is saved by the caller's final phase (with what it adds: metrics, fusion).
      at_checkpoint = (s.checkpoint_every and step % s.checkpoint_every == 0
                       and step < s.total_steps)
      at_eval = (evaluate is not None and s.eval_every and step % s.eval_every == 0
                 and step < s.total_steps)
      at_stop = s.steps_per_run and step - start >= s.steps_per_run and step < s.total_steps
      # Every step that saves is a log step: its window's losses are checked first.
      if not (step % s.log_every == 0 or at_checkpoint or at_eval or at_stop or preempted
              or step == s.total_steps):
        continue
      log_train(step)
      if preempted:
        save(step)
        checkpointer.wait()
        print(f"\nSIGTERM received: saved step {step} to {checkpointer.directory}; exiting "
              f"with code {errors.EXIT_PREEMPTED} so the job is re-run (the same command "
              "resumes).", flush=True)
        return LoopResult(state, step, finished=False, preempted=True)
      if at_stop:
        save(step)
        print(f"\nRan steps_per_run={s.steps_per_run} steps: saved step {step}; run the same "
              "command again to continue.")
        return LoopResult(state, step, finished=False)
      eval_metrics = None
      if at_eval:
        last_results = evaluate(state, step)
        eval_metrics = flat_metrics(last_results)
        if s.best_metric and s.patience and early.update(eval_metrics):
          print(f"\nEarly stopping at step {step}: {s.best_metric} has not improved for "
                f"{early.evals_since_best} evaluations (best {early.best:.4f}).")
          save(step, eval_metrics)
          return LoopResult(state, step, finished=True, last_results=last_results)
      if at_checkpoint or at_eval:
        save(step, eval_metrics if s.best_metric else None)
      window.restart_clock()  # logging, evaluation and saving are not training time
  finally:
    progress.close()
  return LoopResult(state, step, finished=True, last_results=last_results)
