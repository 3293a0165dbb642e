"""The cities a study collects: names, search queries, centres, bounding boxes.

The ten defaults ship in ``featkit/data/cities.toml``; a user file of the same
format replaces them. A city's ``name`` becomes a folder under
``cache/images/`` and the label in every report, so it is validated as a safe
folder name.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from featkit.errors import FeatkitError
from featkit.options import DOWNLOAD

# Letters, digits, space, dot, underscore, hyphen; starts with a letter or digit,
# ends with neither a space nor a dot (Windows trims those), at most 64 chars.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9 ._-]{0,62}[A-Za-z0-9_-])?$")
_CITY_KEYS = {"name", "query", "lat", "lon", "bbox", "study_accuracy"}


@dataclass(frozen=True)
class City:
    """One city of a study.

    ``query`` is the place text put into the query template (``"{city} streets"``);
    an empty query means "search by ``bbox`` only".
    ``bbox`` is ``(min_lon, min_lat, max_lon, max_lat)`` in degrees, or None.
    """

    name: str
    query: str
    lat: float
    lon: float
    bbox: tuple[float, float, float, float] | None = None
    study_accuracy: float | None = None  # the seed study's test accuracy for this city, where it had one

    def search_text(self, template: str = DOWNLOAD.query_template) -> str | None:
        """The ``text`` parameter for Flickr's search, or None for a bbox-only city."""
        if not self.query:
            return None
        return template.format(city=self.query)


def default_cities_path() -> Path:
    """Where the ten default cities are defined (inside the installed package)."""
    return Path(str(resources.files("featkit") / "data" / "cities.toml"))


def load_cities(spec: str | None = None) -> list[City]:
    """Resolve a ``--cities`` value to a list of cities.

    ``None`` or ``""``: the ten defaults. A comma list (``"London,Paris"``):
    those defaults, matched case-insensitively. A path to a ``.toml`` file:
    the cities defined there.
    """
    defaults = _parse_cities_toml(default_cities_path().read_text(encoding="utf-8"), "default cities")
    if spec is None or not spec.strip():
        return defaults
    spec = spec.strip()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".toml") or path.is_file():
        if not path.is_file():
            raise FeatkitError(f"cities file not found: {spec}; expected a TOML file with [[city]] entries", param="cities")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FeatkitError(f"cannot read cities file {spec}: {e}", param="cities") from None
        try:
            return _parse_cities_toml(text, str(path))
        except FeatkitError as e:  # the file's own faults are the `cities` option's
            raise FeatkitError(str(e), param="cities") from None
    by_name = {c.name.lower(): c for c in defaults}
    chosen: list[City] = []
    for raw in spec.split(","):
        key = raw.strip().lower()
        if not key:
            continue
        if key not in by_name:
            valid = ", ".join(c.name for c in defaults)
            raise FeatkitError(
                f"unknown city {raw.strip()!r}; choose from the defaults: {valid} "
                "(or pass a .toml file with your own cities)",
                param="cities",
            )
        if by_name[key] not in chosen:
            chosen.append(by_name[key])
    if not chosen:
        raise FeatkitError(f"no cities in {spec!r}; give a comma list such as 'London,Paris' or a .toml file", param="cities")
    return chosen


def validate_city_name(name: object, where: str = "cities") -> str:
    """Return ``name`` if it is a safe folder name, else raise FeatkitError."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise FeatkitError(
            f"{where}: city name {name!r} is not a safe folder name; use 1-64 letters, digits, "
            "spaces, '.', '_' or '-', starting with a letter or digit (e.g. 'New York')"
        )
    return name


def _parse_cities_toml(text: str, where: str) -> list[City]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FeatkitError(f"{where}: not valid TOML ({e})") from None
    entries = data.get("city")
    if not isinstance(entries, list) or not entries:
        raise FeatkitError(f"{where}: expected one or more [[city]] tables with name, query, lat, lon and optional bbox")
    cities: list[City] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise FeatkitError(f"{where}: city #{i} is not a table")
        city = _parse_city(entry, f"{where}: city #{i}")
        if city.name.lower() in seen:
            raise FeatkitError(f"{where}: city name {city.name!r} appears twice")
        seen.add(city.name.lower())
        cities.append(city)
    return cities


def _parse_city(entry: dict, where: str) -> City:
    unknown = set(entry) - _CITY_KEYS
    if unknown:
        raise FeatkitError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; valid fields: {', '.join(sorted(_CITY_KEYS))}")
    name = validate_city_name(entry.get("name"), where)
    where = f"{where} ({name})"
    query = entry.get("query", name)
    if not isinstance(query, str):
        raise FeatkitError(f"{where}: query must be a string")
    query = " ".join(query.split())
    bbox = None
    if entry.get("bbox") is not None:
        bbox = _parse_bbox(entry["bbox"], where)
    if not query and bbox is None:
        raise FeatkitError(f"{where}: an empty query needs a bbox = [min_lon, min_lat, max_lon, max_lat]")
    if "lat" in entry or "lon" in entry or bbox is None:
        lat = _number(entry.get("lat"), where, "lat", -90, 90)
        lon = _number(entry.get("lon"), where, "lon", -180, 180)
    else:  # centre of the box when only a box is given
        lat, lon = (bbox[1] + bbox[3]) / 2, (bbox[0] + bbox[2]) / 2
    study = None if entry.get("study_accuracy") is None else _number(entry["study_accuracy"], where, "study_accuracy", 0, 1)
    return City(name=name, query=query, lat=lat, lon=lon, bbox=bbox, study_accuracy=study)


def _number(value: object, where: str, field: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise FeatkitError(f"{where}: {field} must be a number between {lo} and {hi}, got {value!r}")
    return float(value)


def _parse_bbox(value: object, where: str) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4:
        raise FeatkitError(f"{where}: bbox must be [min_lon, min_lat, max_lon, max_lat], got {value!r}")
    min_lon = _number(value[0], where, "bbox min_lon", -180, 180)
    min_lat = _number(value[1], where, "bbox min_lat", -90, 90)
    max_lon = _number(value[2], where, "bbox max_lon", -180, 180)
    max_lat = _number(value[3], where, "bbox max_lat", -90, 90)
    if not (min_lon < max_lon and min_lat < max_lat):
        raise FeatkitError(f"{where}: bbox must be [min_lon, min_lat, max_lon, max_lat] with min < max, got {value!r}")
    return (min_lon, min_lat, max_lon, max_lat)


EARTH_RADIUS_KM = 6371.0088  # mean Earth radius (IUGG)


def great_circle_km(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (haversine; broadcasts over arrays)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def haversine_km(a: City | tuple[float, float], b: City | tuple[float, float]) -> float:
    """Great-circle distance in km between two cities or ``(lat, lon)`` pairs."""
    lat1, lon1 = (a.lat, a.lon) if isinstance(a, City) else a
    lat2, lon2 = (b.lat, b.lon) if isinstance(b, City) else b
    return float(great_circle_km(lat1, lon1, lat2, lon2))


FOLDER_CITIES_FILE = "cities.toml"  # a photo folder may carry its own cities (with coordinates) beside the city folders


def city_coordinates(names: list[str], spec: str | None = None, photo_roots: list[Path] = ()) -> dict:
    """Centre coordinates for the cities a cache holds, for distances between cities.

    Looked up by name (case-insensitively) in the first of: ``spec`` (a ``--cities``
    value: a .toml file or default names), a ``cities.toml`` in the photo folder
    (``photo_roots``), the default cities. Returns ``{"source", "coords": {name:
    (lat, lon)}, "missing": [names without coordinates]}``.
    """
    if spec:
        found, source = load_cities(spec), str(spec)
    else:
        files = [Path(r) / FOLDER_CITIES_FILE for r in photo_roots]
        files = [f for f in files if f.is_file()]
        if files:
            found, source = load_cities(str(files[0])), str(files[0])
        else:
            found, source = load_cities(), "featkit's default cities"
    by_name = {c.name.lower(): c for c in found}
    coords = {n: (by_name[n.lower()].lat, by_name[n.lower()].lon) for n in names if n.lower() in by_name}
    return {"source": source, "coords": coords, "missing": [n for n in names if n not in coords]}
