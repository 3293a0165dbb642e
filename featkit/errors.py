"""The one exception type the CLI turns into a clean one-line message."""


class FeatkitError(Exception):
    """A user-facing error: what was wrong, what was expected, how to fix it.

    The CLI prints ``str(error)`` on one line and exits non-zero; library callers
    can catch it like any exception.
    """
