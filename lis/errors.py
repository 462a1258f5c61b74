"""The one exception type for user mistakes.

The CLI turns an ``LISError`` into a one-line message on stderr and exit code 2
(no traceback); anything else is a bug and keeps its traceback.
"""


class LISError(Exception):
    """A user mistake (bad config, missing data, wrong checkpoint): say what and how to fix it."""
