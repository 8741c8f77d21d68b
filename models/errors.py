"""The exceptions of the models package; ``python -m app`` maps them to exit codes."""
from __future__ import annotations


class ModelError(ValueError):
    """A model or training setting the user can fix: the message is one sentence naming the bad
    value and the fix."""


class TrainingDiverged(RuntimeError):
    """Training blew up (non-finite or out-of-bound loss or statistics): the message names the
    step and the first layer that blew up."""
