import dataclasses

import pytest

from featkit.cities import City, haversine_km, load_cities
from featkit.errors import FeatkitError

DEFAULT_NAMES = ["Paris", "Tokyo", "London", "Bangkok", "New York", "Amsterdam", "Mumbai", "Barcelona",
                 "Venice", "Los Angeles"]


def test_defaults_are_the_ten_study_cities():
    cities = load_cities(None)
    assert [c.name for c in cities] == DEFAULT_NAMES
    paris = cities[0]
    assert paris.search_text() == "Paris streets"
    assert paris.search_text("{city} night") == "Paris night"
    assert 48 < paris.lat < 49 and 2 < paris.lon < 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        paris.name = "Lyon"


def test_subset_is_case_insensitive_and_keeps_order():
    assert [c.name for c in load_cities(" london, PARIS ,new york")] == ["London", "Paris", "New York"]


def test_unknown_city_lists_valid_names():
    with pytest.raises(FeatkitError) as e:
        load_cities("London,Atlantis")
    msg = str(e.value)
    assert "'Atlantis'" in msg and "Los Angeles" in msg and "\n" not in msg


def test_user_toml_with_bbox_only_city(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('[[city]]\nname = "Lyon"\nlat = 45.76\nlon = 4.83\n\n'
                 '[[city]]\nname = "Box_Town"\nquery = ""\nbbox = [4.0, 45.0, 5.0, 46.0]\n')
    lyon, box = load_cities(str(f))
    assert lyon == City("Lyon", "Lyon", 45.76, 4.83, None)
    assert box.search_text() is None and box.bbox == (4.0, 45.0, 5.0, 46.0)
    assert (box.lat, box.lon) == (45.5, 4.5)


@pytest.mark.parametrize("body, needle", [
    ('[[city]]\nname = "../etc"\nlat = 1\nlon = 1\n', "safe folder name"),
    ('[[city]]\nname = "a/b"\nlat = 1\nlon = 1\n', "safe folder name"),
    ('[[city]]\nname = "Lyon"\nlat = 100\nlon = 1\n', "lat must be"),
    ('[[city]]\nname = "Lyon"\nlat = 1\nlon = 1\nbbox = [5, 1, 4, 2]\n', "min < max"),
    ('[[city]]\nname = "Lyon"\nlat = 1\nlon = 1\nqeury = "x"\n', "unknown field"),
    ('[[city]]\nname = "Lyon"\nquery = ""\nlat = 1\nlon = 1\n', "needs a bbox"),
    ('[[city]]\nname = "Lyon"\nlat = 1\nlon = 1\n[[city]]\nname = "lyon"\nlat = 1\nlon = 1\n', "twice"),
    ('name = "Lyon"\n', "[[city]]"),
    ('[[city]\n', "not valid TOML"),
])
def test_bad_user_toml_gives_one_line_error(tmp_path, body, needle):
    f = tmp_path / "bad.toml"
    f.write_text(body)
    with pytest.raises(FeatkitError) as e:
        load_cities(str(f))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_cities_file():
    with pytest.raises(FeatkitError, match="not found"):
        load_cities("/nonexistent/cities.toml")


def test_haversine():
    paris, london = load_cities("Paris,London")
    assert haversine_km(paris, london) == pytest.approx(344, abs=3)
    assert haversine_km((0.0, 0.0), (0.0, 180.0)) == pytest.approx(20015, rel=1e-3)
    assert haversine_km(paris, paris) == 0
