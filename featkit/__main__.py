"""``python -m featkit`` (and ``torchrun -m featkit``) runs the ``featkit`` command."""

from cli import app

app()
