"""The download folder's record of what it holds: ``manifest.csv``, ``skipped.csv`` and the journal of
changes since they were last written (:class:`Journal`), for :mod:`featkit.collect`.

A kept or rejected photo counts once its line is in the journal (one JSON line, flushed); the CSVs are
rewritten atomically from time to time (:meth:`Journal.flush`), which empties the journal. A run killed at
any point is resumed by reading both CSVs and replaying the journal (a line cut by the kill is ignored).
The manifest's format is :mod:`featkit.manifest`'s.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from featkit.cache.names import DOWNLOAD_JOURNAL, DOWNLOAD_MANIFEST, IMAGES_DIR, SKIPPED_CSV
from featkit.manifest import MANIFEST_COLUMNS, SKIPPED_COLUMNS, read_manifest, write_manifest

PHOTO_ID = re.compile(r"^[0-9]{1,20}$")  # a Flickr photo id
TMP_SUFFIX = ".tmp"  # a file being written (an image, a CSV): deleted by the next run if a kill left it


class Journal:
    """What one output folder holds: manifest rows, skipped rows, and the journal of changes since.

    Every change is appended to the journal (one JSON line, flushed) before it
    counts; :meth:`flush` rewrites both CSVs atomically and empties the journal.
    Columns a user added to the manifest are kept.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.manifest = out_dir / DOWNLOAD_MANIFEST
        self.skipped_path = out_dir / SKIPPED_CSV
        self.path = out_dir / DOWNLOAD_JOURNAL
        self.rows: dict[str, dict[str, str]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        self.columns = {self.manifest: MANIFEST_COLUMNS, self.skipped_path: SKIPPED_COLUMNS}
        self._fh: io.TextIOWrapper | None = None
        self.dirty = 0

    def load(self) -> None:
        """Read both CSVs (with :func:`featkit.manifest.read_manifest`), then replay the journal."""
        for path, target in ((self.manifest, self.rows), (self.skipped_path, self.skipped)):
            if path.exists():
                ours = self.columns[path]
                columns, rows = read_manifest(path, ours, fix=f"expected the columns featkit download writes "
                                              f"({','.join(ours)}); move it away to start a new download there")
                self.columns[path] = (*ours, *(c for c in columns if c not in ours))
                target.update((row["photo_id"], row) for row in rows)
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                self._apply(entry)

    def _apply(self, entry: dict) -> None:
        kind, row = entry.get("kind"), entry.get("row") or {}
        pid = row.get("photo_id", "")
        if not PHOTO_ID.match(pid):
            return
        if kind == "keep":
            self.rows[pid] = {c: row.get(c, "") for c in MANIFEST_COLUMNS}
            self.skipped.pop(pid, None)
        elif kind == "drop":
            self.rows.pop(pid, None)
            self.skipped[pid] = {c: row.get(c, "") for c in SKIPPED_COLUMNS}

    def record(self, kind: str, row: dict[str, str]) -> None:
        """Apply and journal one change (``keep`` a row, or ``drop`` an id with a reason)."""
        self._apply({"kind": kind, "row": row})
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps({"kind": kind, "row": row}) + "\n")
        self._fh.flush()
        self.dirty += 1

    def flush(self) -> None:
        """Rewrite manifest and skipped list atomically, then empty the journal."""
        for path, rows in ((self.manifest, self.rows), (self.skipped_path, self.skipped)):
            ordered = sorted(rows.values(), key=lambda r: (r.get("city", ""), int(r["photo_id"])))
            write_manifest(path, ordered, self.columns[path])
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self.path.unlink(missing_ok=True)
        self.dirty = 0

    def remove_leftovers(self) -> None:
        """Delete temporary files a killed run left: partial images and half-written CSVs."""
        for path in (self.manifest, self.skipped_path):
            for tmp in self.out_dir.glob(f".{path.name}.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
        images = self.out_dir / IMAGES_DIR
        images.mkdir(exist_ok=True)
        for city_dir in images.iterdir():
            if city_dir.is_dir():
                for tmp in city_dir.glob(f"*{TMP_SUFFIX}"):
                    tmp.unlink(missing_ok=True)

    def kept(self, city: str) -> list[dict[str, str]]:
        return [r for r in self.rows.values() if r["city"] == city]


