"""The one exception type for bad user input: the app prints its message as one line and exits 2."""


class UserError(ValueError):
    """A problem the user can fix; the message names the bad value and the fix, in one sentence."""
