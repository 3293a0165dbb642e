"""Run the ``featkit`` command from a checkout without installing it: ``python cli.py extract ...``.

The command itself lives in the package (:mod:`featkit.cli`, installed as the
``featkit`` console script); this file is only a shim and is not installed.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from featkit.cli import app  # noqa: E402

if __name__ == "__main__":
    app()
