"""How every command line (train, evaluate, score, the benchmarks) parses its flags and what it
does with a failure.

Flags: absl, declared per command and parsed by ``parse_flags``; config overrides are
``ml_collections.config_flags`` ones (``--config=configs/x.py --config.data.path=DIR``).

Exit codes: 0 done; 2 a user mistake (bad flag, config, data, path or checkpoint), printed as
ONE line on stderr saying what is wrong and how to fix it; 3 the run diverged (NaN / inf
loss); 143 stopped by SIGTERM after saving (a scheduler should re-run the same command);
1 anything else, which is a bug and keeps its Python traceback. ``--verbose`` or
``CROSSREC_TRACEBACK=1`` also prints the traceback of a user mistake.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Callable, Sequence

from crossrec_jax import errors


def main_of(fn: Callable[[], object], argv: Sequence[str] | None = None) -> int:
  """Exit code of a script's ``main`` (any return value) under ``guarded``."""
  argv = sys.argv if argv is None else argv
  return guarded(lambda: (fn(), 0)[1], traceback_requested(argv))


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that are the user's to fix (imported lazily: no JAX at import time)."""
  from crossrec_jax.checkpoint import CheckpointIncompatibleError  # pylint: disable=import-outside-toplevel
  from crossrec_jax.data.records import DataError  # pylint: disable=import-outside-toplevel
  from crossrec_jax.models.hf import CheckpointError  # pylint: disable=import-outside-toplevel
  return (errors.ConfigError, errors.UsageError, DataError, CheckpointError, CheckpointIncompatibleError,
          errors.ScoringError)


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
    return errors.EXIT_USER_ERROR
  except errors.NonFiniteLossError as e:
    report(e, verbose, prefix="diverged")
    return errors.EXIT_DIVERGED


def parse_flags(argv: Sequence[str], define: Callable,
                config_doc: str = "crossrec_jax/config_defaults.py"):
  """Parses ``argv`` (program name first) with a private absl ``FlagValues`` (so tests can call
  it in-process); returns it. Every command line parses its flags here.

  ``define(flag_values, argv)`` declares the flags (config_flags reads ``--config.x=y``
  overrides from argv). A bad flag, a missing / broken config file or a mistyped
  ``--config.field`` raises ``errors.UsageError``; ``--help`` prints the flags and exits 0.
  ``config_doc`` is where the config's fields are listed (named in the unknown-field error).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  argv = list(argv)
  fv = flags.FlagValues()
  flags.DEFINE_bool("verbose", False, "Print the Python traceback of user errors too (and, in "
                    "the benchmarks, training progress).", flag_values=fv)
  try:
    define(fv, argv)  # a config dict's overrides are read here already
    if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
      print(fv.get_help())
      raise SystemExit(0)
    rest = fv(argv)[1:]
    if "config" in fv:
      getattr(fv["config"].value, "keys", None)  # a config file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except
    # Flag syntax, a missing / broken config file, a mistyped --config.field: all user input.
    message = one_line(e)
    if isinstance(e, (KeyError, AttributeError)):  # an override names a field the config lacks
      field = next(iter(re.findall(r"\w+", str(e))), "")  # ml_collections adds "Did you mean"
      guess = re.search(r'Did you mean "(\w+)"', str(e))
      flag = next((a for a in argv if a.startswith("--config.")
                   and field in a.split("=")[0].split(".")), "--config.?")
      message = (f"{flag}: the config has no field {field!r}"
                 + (f" (did you mean {guess[1]!r}?)" if guess else "")
                 + f"; all fields and defaults: {config_doc}")
    elif isinstance(e, flags.UnrecognizedFlagError):  # name it as typed: --splitt, not 'splitt'
      message = message.replace(f"flag '{e.flagname}'", f"flag --{e.flagname}")
    elif message.startswith("Missing value for flag"):
      message += " (write it as --KEY=VALUE or --KEY VALUE)"
    raise errors.UsageError(f"{message} (run with --help for the flags)") from e
  if rest:  # absl leaves what is not a flag; no command takes positional arguments
    raise errors.UsageError(f"unexpected argument(s) {rest}: every input is a --flag, and a list is "
                     "comma-separated (--knn_k=20,50) (run with --help for the flags)")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # absl logging otherwise warns "logging before flag parsing"
  return fv


def run_absl(argv: Sequence[str] | None, define: Callable, main: Callable, **kwargs) -> int:
  """Parses ``argv`` (``parse_flags``, whose keyword arguments it passes on) and runs
  ``main(flag_values)`` under ``guarded``; returns the exit code."""
  argv = list(sys.argv if argv is None else argv)
  verbose = traceback_requested(argv)
  try:
    fv = parse_flags(argv, define, **kwargs)
  except errors.UsageError as e:
    report(e, verbose)
    return errors.EXIT_USER_ERROR
  except SystemExit as e:  # --help
    return int(e.code or 0)
  return guarded(lambda: main(fv), verbose or fv.verbose)


def define_number_list(name: str, default: Sequence, kind: type, help_text: str, fv) -> None:
  """A comma-separated list of ``kind`` (int / float) flag, e.g. ``--knn_k=20,50``."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  class Parser(flags.ListParser):
    def parse(self, argument):
      return [kind(x) for x in super().parse(argument)]  # ValueError: absl names the flag

  flags.DEFINE(Parser(), name, list(default), help_text, flag_values=fv,
               serializer=flags.CsvListSerializer(","))
