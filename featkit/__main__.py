"""``python -m featkit`` (and ``torchrun -m featkit``) runs the ``featkit`` command."""

from featkit.cli import app

app()
