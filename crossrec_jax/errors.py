"""Error types and exit codes, imported by every layer; the command lines (cli.py) map them to
one line on stderr and an exit code."""

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


class OutOfMemoryError(ConfigError, MemoryError):
  """A step sized before it ran needs more memory than is free; the message names the setting
  that bounds it (a user's to change: exit 2, never a native crash)."""
