"""The application's errors: input it cannot use. The `fxsparse` command prints each as one line and exits 2."""

from __future__ import annotations


class CommandError(Exception):
    """Bad input to `fxsparse train | export | flops`; the message says what is wrong and what to do."""


class ConfigError(CommandError, ValueError):
    """A setting or config file that cannot be used; the message says what to write instead."""


class DataError(CommandError, RuntimeError):
    """A dataset is missing, incomplete or corrupt; the message says what and what to do."""


class SetupError(CommandError, RuntimeError):
    """The run cannot start as asked (a missing optional package, an absent device)."""


class CheckpointError(CommandError, ValueError):
    """A checkpoint that cannot be read or does not hold what the command needs."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (unpickling errors run to a dozen lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
