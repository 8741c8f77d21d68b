"""Exceptions the app turns into one line on stderr and a non-zero exit code (no traceback)."""


class UserError(ValueError):
    """A problem the user can fix; the message names the bad value and the fix, in one sentence.

    Exit code 2."""


class TrainingDiverged(RuntimeError):
    """Training blew up (non-finite or out-of-bound loss/statistics); the message names the step
    and the first layer that blew up. Exit code 3."""


EXIT_CODES: dict[type[Exception], int] = {UserError: 2, TrainingDiverged: 3}
