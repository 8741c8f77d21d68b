"""Exit codes: every failure a user can cause is one line on stderr and exit code 2.

The library packages own their exceptions (``models.errors``, ``data.errors``); the app adds its
own for command-line mistakes and maps them all to exit codes here. Anything else is an internal
bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations

from data.errors import DataError
from models.errors import ModelError, Preempted, TrainingDiverged


class UserError(ValueError):
    """A command-line mistake (unknown subcommand, bad flag, missing config): one sentence
    naming the bad value and the fix."""


# exception class -> exit code; a preempted run exits with 128 + the signal, as if killed by it
EXIT_CODES: dict[type[BaseException], int] = {
    UserError: 2, ModelError: 2, DataError: 2,
    TrainingDiverged: 3,
    Preempted: 128,
}
USER_ERRORS = (UserError, ModelError, DataError)


def exit_code(err: BaseException) -> int:
    code = next(c for cls, c in EXIT_CODES.items() if isinstance(err, cls))
    return code + err.signum if isinstance(err, Preempted) else code
