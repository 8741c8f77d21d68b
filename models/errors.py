"""The exceptions of the models package; ``python -m app`` maps them to exit codes."""
from __future__ import annotations


class ModelError(ValueError):
    """A model or training setting the user can fix: the message is one sentence naming the bad
    value and the fix."""


class Preempted(Exception):
    """Training stopped on a signal (a scheduler's SIGTERM, SLURM's SIGUSR1) after writing a
    resumable checkpoint; ``signum`` is the signal, ``path`` the checkpoint."""

    def __init__(self, signum: int, step: int, path: object) -> None:
        import signal

        self.signum, self.step, self.path = signum, step, path
        where = f"resumable checkpoint {path}" if path else "no checkpoint written"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {where}; "
                         f"resume with --ckpt_path last (and the same --run)")


class TrainingDiverged(RuntimeError):
    """Training blew up (non-finite or out-of-bound loss or statistics): the message names the
    step and the first layer that blew up."""
