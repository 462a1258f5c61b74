"""The exceptions the CLI turns into one line on stderr (no traceback).

``LISError`` is a user mistake (exit code 2). ``RunStopped`` errors stop a
run that has started and keep its directory and last checkpoint, so that
``lis compress --resume`` can continue it: ``Interrupted`` (SIGINT/SIGTERM,
exit 130/143) and ``NumericalFault`` (a NaN or Inf, exit 3). Anything else is
a bug and keeps its traceback.
"""


class LISError(Exception):
    """A user mistake (bad config, missing data, wrong checkpoint): say what and how to fix it."""

    exit_code = 2


class RunStopped(LISError):
    """A run stopped part-way; its directory and last checkpoint stay for ``--resume``."""


class Interrupted(RunStopped):
    """SIGINT or SIGTERM: the run saved a checkpoint and stopped."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NumericalFault(RunStopped):
    """A NaN or Inf in a loss, a gradient, the dean's outputs or the ADMM state."""

    exit_code = 3
