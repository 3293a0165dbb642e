"""The typed result of ``featkit compare``: :class:`Comparison` (every head on one test split) and one
:class:`HeadResult` per head, made by :mod:`featkit.evaluate`, written by :mod:`featkit.report`, returned
by :func:`featkit.compare` and read by the CLI.

:meth:`Comparison.to_dict` is ``compare.json``: the same keys, in the same order, as before the result
had a type (``tests/test_comparison.py`` holds that key set). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

Interval = tuple[float, float]  # a 95% bootstrap interval (low, high)


@dataclass
class HeadResult:
    """One fitted head on the test photos: :func:`featkit.metrics.evaluate_predictions`' figures, then
    what its saved record says of its fit. Per-photo lists follow :attr:`Comparison.test_photos`."""

    n: int  # test photos
    accuracy: float
    accuracy_ci: Interval
    macro_accuracy: float
    macro_accuracy_ci: Interval
    top3: float
    top3_ci: Interval
    per_city: dict[str, float]
    per_city_ci: dict[str, Interval]
    confusion: list[list[int]]  # true city in rows, predicted in columns, in the order of ``cities``
    true_share: dict[str, float]
    predicted_share: dict[str, float]
    correct: list[int]  # per test photo: 1 when right
    predicted: list[int]  # per test photo: index into ``cities``
    confidence: list[float]  # per test photo: the top-1 probability
    calibration: dict[str, Any]
    confused_pairs: list[dict[str, Any]]
    backbone: str = ""  # the backbone key the head was fitted on
    head: str = ""  # the head's registry name
    val_score: float | None = None
    fit_seconds: float | None = None
    chosen: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    validation_curve: list[float] | dict[str, float] | None = None  # None: the head keeps none (an optional capability)
    at_grid_edge: bool | None = None  # None: the head does not say
    geo: dict[str, Any] | None = None  # how far off, in km; None when a city has no coordinates
    name: str = ""  # the head's name as the user spells it (``timm:NAME/mlp``); the key of ``heads`` is the file key's
    backbone_name: str = ""  # the backbone as the user spells it (``timm:NAME``)
    extra: dict[str, Any] = field(default_factory=dict)  # figures metrics may add later, kept in the JSON

    @classmethod
    def from_metrics(cls, metrics: dict, **record) -> "HeadResult":
        """From ``evaluate_predictions``' dict (unknown figures go to :attr:`extra`) and record fields."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in metrics.items() if k in names}
        return cls(**known, **record, extra={k: v for k, v in metrics.items() if k not in names})

    def to_dict(self) -> dict:
        """The head's entry in ``compare.json``: the metrics, then the record's fields (``geo`` only when known)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)[: _N_METRICS]}
        out.update(self.extra)
        for name in _RECORD:
            out[name] = getattr(self, name)
        if self.geo is not None:
            out["geo"] = self.geo
        for name in _NAMES:
            out[name] = getattr(self, name)
        return out


_RECORD = ("backbone", "head", "val_score", "fit_seconds", "chosen", "seed", "validation_curve", "at_grid_edge")
_NAMES = ("name", "backbone_name")  # additions after the record's fields (compare.json's older keys keep their order)
_N_METRICS = [f.name for f in fields(HeadResult)].index("backbone")


@dataclass
class Ranking:
    """Heads best first (accuracy, then name), every pair compared on the same photos, and a verdict."""

    ranking: list[str]
    pairs: dict[str, dict[str, Any]]  # "a vs b" -> McNemar and the paired bootstrap of the difference
    verdict: str

    def to_dict(self) -> dict:
        return {"ranking": self.ranking, "pairs": self.pairs, "verdict": self.verdict}


@dataclass
class Comparison:
    """Every fitted head of a cache on the same test photos: what ``compare.md``, ``.json`` and ``.html`` show."""

    cities: list[str]
    heads: dict[str, HeadResult]  # by name: ``mlp``, or ``<backbone>/mlp`` with several backbones
    test_photos: list[dict[str, str]]  # photo_id, city, path, owner
    geo: dict[str, Any]  # source, missing, coords of the cities
    leaks: dict[str, Any] | None  # the split check (None when not run)
    ranking: Ranking
    n_test: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    cache_path: str
    cache_id: str
    backbone: str
    backbones: dict[str, str]  # key -> description
    featkit: str  # featkit's version
    generated: str  # when
    provenance: dict[str, Any]
    backbone_names: dict[str, str] = field(default_factory=dict)  # key -> the backbone as the user spells it

    @property
    def best(self) -> str:
        """The best head: first of the ranking (accuracy, then name), whose galleries the report shows."""
        return self.ranking.ranking[0] if self.ranking.ranking else max(self.heads, key=lambda h: self.heads[h].accuracy)

    def to_dict(self) -> dict:
        """``compare.json``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["heads"] = {name: h.to_dict() for name, h in self.heads.items()}
        out["ranking"] = self.ranking.to_dict()
        return out

    def __getitem__(self, key: str):
        """``results["heads"]``: the comparison read as ``compare.json`` reads (as featkit.compare returned before)."""
        return self.to_dict()[key]


def as_dict(results: Comparison | dict) -> dict:
    """``compare.json``'s mapping of a :class:`Comparison` (a mapping of that shape is taken as it is)."""
    return results.to_dict() if isinstance(results, Comparison) else results
