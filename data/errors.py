"""The exception of the data package; ``python -m app`` maps it to exit code 2."""
from __future__ import annotations


class DataError(ValueError):
    """Data or a data setting the user can fix (a missing file, a corrupt .beton, a bad option):
    the message is one sentence naming the problem and the fix."""
