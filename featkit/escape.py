"""Outside text (file and place names, photo titles, owner names, reasons quoting them) made inert for the
sink it is written to: a terminal, a CSV file a spreadsheet may open, Markdown (:func:`featkit.report.md`
builds on :func:`printable`; HTML is escaped by the template engine).

- :func:`printable`: control characters (C0, DEL, C1: ESC starts terminal control sequences) and the
  bidirectional-override characters (which reorder what a reader sees) written as ``\\xNN`` / ``\\uNNNN``.
- :func:`csv_cell`: :func:`printable`, and a cell that a spreadsheet would run as a formula (first character
  ``=``, ``+``, ``-``, ``@``, tab or carriage return) prefixed with ``'``, as OWASP advises for CSV
  injection. :func:`csv_value` undoes the prefix for featkit's own manifests, which it reads back.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_NEWLINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _escaped(m: re.Match) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text, *, newlines: bool = False) -> str:
    """``text`` with every control and bidi-override character escaped (tabs and, with ``newlines``, line
    breaks kept); nothing a terminal acts on is left."""
    return (_CONTROL if newlines else _CONTROL_OR_NEWLINE).sub(_escaped, str(text))


def csv_cell(value) -> str:
    """One CSV cell of outside text: printable, and never read as a formula by a spreadsheet."""
    text = str(value)
    if text.startswith(FORMULA_STARTS):
        text = "'" + text
    return printable(text)


def csv_value(cell: str) -> str:
    """A cell :func:`csv_cell` wrote, as it was (the formula guard removed; escaped control characters stay)."""
    if cell.startswith("'") and cell[1:].startswith(("=", "+", "-", "@", "\\x09", "\\x0d")):
        return cell[1:]
    return cell


def json_printable(line: str) -> str:
    """A JSON text (``ensure_ascii=False``, which escapes C0 controls itself) with C1 controls and bidi
    overrides written as JSON's own ``\\uNNNN``: still valid JSON, and inert on a terminal."""
    return _CONTROL_OR_NEWLINE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", line)


_URL_CREDENTIALS = re.compile(r"(?<=://)[^/?#@\s]+@")


def without_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it (``https://user:PASS@host/``) written ``***@``."""
    return _URL_CREDENTIALS.sub("***@", str(text))
