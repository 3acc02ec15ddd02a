"""The one exception type users see.

Anything raised as `DifflmError` is bad input the user can fix: the CLI prints its message on
one line (no traceback) and exits with status 2. Everything else is a bug and keeps its traceback.
"""


class DifflmError(Exception):
    """A user-facing error: the message names the problem and the fix."""
