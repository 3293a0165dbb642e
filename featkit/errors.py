"""The one exception type the CLI turns into a clean one-line message."""

from __future__ import annotations


class FeatkitError(Exception):
    """A user-facing error: what was wrong, what was expected, how to fix it.

    The CLI prints it on one line and exits non-zero; library callers can
    catch it like any exception. ``param`` names the Python parameter at fault
    (``batch_size``); the message names it in backquotes (`batch_size`),
    and the CLI shows the matching option (``--batch-size``) there instead.
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class UntrustedHeadWarning(UserWarning):
    """A ``*.joblib`` under a heads folder that is not in its manifest (planted, copied, stale or edited):
    ignored, never unpickled. The CLI prints it as one ``warning:`` line."""


class PhotoSourceWarning(UserWarning):
    """Entries of a photo folder that are not read as photos (a hidden or empty city folder, an image outside
    any city folder, a folder link loop): left out, and said so. The CLI prints it as one ``warning:`` line."""


class CacheDamaged(FeatkitError):
    """A feature file that is not whole (fails its checks, or cannot be read as a cache): the message names the
    file and the fix (``--repair`` or ``--overwrite``). ``featkit verify`` exits 1 on it, like on damage it
    finds itself; other commands exit 2, as on any error."""
