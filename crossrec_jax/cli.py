"""What every command line (train, evaluate, score, benchmarks) does with a failure.

Exit codes: 0 done; 2 a user mistake (bad flag, config, data, path or checkpoint), printed as
ONE line on stderr saying what is wrong and how to fix it; 3 the run diverged (NaN / inf
loss); 143 stopped by SIGTERM after saving (a scheduler should re-run the same command);
1 anything else, which is a bug and keeps its Python traceback. ``--verbose`` or
``CROSSREC_TRACEBACK=1`` also prints the traceback of a user mistake.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 128 + 15  # the shell's code for SIGTERM: schedulers re-queue the job


class ConfigError(ValueError):
  """A config value that cannot work (unknown enum value, impossible size, bad workdir, ...)."""


class UsageError(ValueError):
  """A command-line argument that cannot work (missing file, negative count, ...)."""


class ScoringError(ValueError):
  """Bad scoring input (unknown item, empty file, missing column, ...)."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN / inf; the run stops and nothing from it is checkpointed."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a user mistake as one ``UsageError`` line (exit 2 under ``guarded``)."""

  def error(self, message):
    raise UsageError(f"{message} (run with --help for the flags)")


def main_of(fn: Callable[[], object], argv: Sequence[str] | None = None) -> int:
  """Exit code of a script's ``main`` (any return value) under ``guarded``."""
  argv = sys.argv if argv is None else argv
  return guarded(lambda: (fn(), 0)[1], traceback_requested(argv))


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that are the user's to fix (imported lazily: no JAX at import time)."""
  from crossrec_jax.checkpoint import CheckpointIncompatibleError  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data.records import DataError  # pylint: disable=import-outside-toplevel
  from crossrec_jax.models.hf import CheckpointError  # pylint: disable=import-outside-toplevel
  return (ConfigError, UsageError, DataError, CheckpointError, CheckpointIncompatibleError,
          ScoringError)


def traceback_requested(argv: Sequence[str] = ()) -> bool:
  return "--verbose" in argv or os.environ.get("CROSSREC_TRACEBACK", "") not in ("", "0")


def one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def report(error: BaseException, verbose: bool, prefix: str = "error") -> None:
  if verbose:
    traceback.print_exception(error, file=sys.stderr)
  print(f"{prefix}: {one_line(error)}", file=sys.stderr, flush=True)


def guarded(fn: Callable[[], int | None], verbose: bool) -> int:
  """Runs ``fn`` and turns user mistakes into one line + exit code 2."""
  try:
    return int(fn() or 0)
  except user_errors() as e:
    report(e, verbose)
    return EXIT_USER_ERROR
  except NonFiniteLossError as e:
    report(e, verbose, prefix="diverged")
    return EXIT_DIVERGED


def run_absl(argv: Sequence[str] | None, define: Callable, main: Callable) -> int:
  """Parses ``argv`` with a private absl ``FlagValues`` (so tests can call it in-process) and
  runs ``main(flag_values)`` under ``guarded``; returns the exit code.

  ``define(flag_values, argv)`` declares the flags (config_flags reads overrides from argv).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv if argv is None else argv)
  verbose = traceback_requested(argv)
  fv = flags.FlagValues()
  define(fv, argv)
  flags.DEFINE_bool("verbose", False, "Print the Python traceback of user errors too.",
                    flag_values=fv)
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(fv.get_help())
    return 0
  try:
    fv(argv)
    if "config" in fv:
      getattr(fv["config"].value, "keys", None)  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    # Flag syntax, a missing / broken config file, a mistyped --config.field: all user input.
    if verbose:
      traceback.print_exception(e, file=sys.stderr)
    message = one_line(e)
    if isinstance(e, (KeyError, AttributeError)):  # an override names a field the config lacks
      field = str(e.args[0]).strip("\"'") if e.args else ""
      flag = next((a for a in argv if a.startswith("--config.")
                   and field in a.split("=")[0].split(".")), "--config.?")
      message = (f"{flag}: the config has no field {field!r} (all fields and defaults: "
                 "crossrec_jax/config_defaults.py)")
    print(f"error: {message} (run with --help for the flags)", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging otherwise warns "logging before flag parsing"
  return guarded(lambda: main(fv), verbose or fv.verbose)
