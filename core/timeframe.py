"""When a question is about: "last week", "in May", "two years ago", "yesterday", read in the user's time zone.

`time_range` finds the first such phrase in a text and returns the span of time it names, so that recall can prefer
memories from then. It reads English phrases only and never guesses: a text without one gives None. Calendar words
mean calendar spans ("last week" is Monday to Sunday of the week before this one), a day count the day it names, a
month without a year the last such month that has begun. `anchor` finds a time named by something that happened
("before the move", "since my wedding"), for recall to date by the memory that tells of it (`around`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

MONTHS = {name: number for number, names in enumerate(
    (("january", "jan"), ("february", "feb"), ("march", "mar"), ("april", "apr"), ("may",), ("june", "jun"),
     ("july", "jul"), ("august", "aug"), ("september", "sep", "sept"), ("october", "oct"), ("november", "nov"),
     ("december", "dec")), start=1) for name in names}
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
           "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a couple of": 2, "a few": 3, "several": 3}

_MONTH = "|".join(sorted(MONTHS, key=len, reverse=True))
_NUMBER = r"\d{1,3}|" + "|".join(sorted(NUMBERS, key=len, reverse=True))
_ORDINAL = r"(?P<day>\d{1,2})(?:st|nd|rd|th)?"
_YEAR = r"(?P<year>(?:19|20)\d\d)"
# Earlier alternatives win where two could match at the same place.
_PATTERNS = [
    ("ago", rf"\b(?P<n>{_NUMBER})\s+(?P<unit>day|week|month|year)s?\s+ago\b"),
    ("day_before", r"\b(?:the\s+)?day\s+before\s+yesterday\b"),
    ("yesterday", r"\byesterday\b|\blast\s+night\b"),
    ("today", r"\btoday\b|\btonight\b|\bthis\s+(?:morning|afternoon|evening)\b"),
    ("weekday", rf"\b(?:on|last|past)\s+(?P<weekday>{'|'.join(WEEKDAYS)})\b"),
    ("relative", r"\b(?P<which>last|this|next|past)\s+(?P<unit>weekend|week|month|year)\b"),
    ("month_day", rf"\b(?P<month>{_MONTH})\.?\s+{_ORDINAL}\b(?:,?\s+{_YEAR}\b)?"),
    ("day_month", rf"\b{_ORDINAL}\s+(?:of\s+)?(?P<month>{_MONTH})\b\.?(?:,?\s+{_YEAR}\b)?"),
    ("month", rf"\b(?P<edge>in|during|last|since|before|after|until|back\s+in|early|mid|late)\s+(?:of\s+)?"
              rf"(?P<month>{_MONTH})\b\.?(?:\s+{_YEAR}\b)?"),
    ("year", rf"\b(?P<edge>in|during|since|before|after|until|back\s+in)\s+{_YEAR}\b"),
]
# The ends of time, for "before 2020" and "after the move".
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)
_FINDER = re.compile("|".join(f"(?P<{name}>{pattern.replace('(?P<', f'(?P<{name}_')})"
                              for name, pattern in _PATTERNS), re.IGNORECASE)


@dataclass(frozen=True)
class TimeRange:
    """A span of time a text names: from ``start`` (inclusive) to ``end`` (exclusive), both aware."""

    start: datetime
    end: datetime
    phrase: str


def time_range(text: str, now: datetime, zone: ZoneInfo) -> TimeRange | None:
    """The span of time the first date phrase of ``text`` names, in ``zone``, seen from ``now``; None without one."""
    for match in _FINDER.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        parts = {key[len(kind) + 1:]: value for key, value in match.groupdict().items()
                 if key.startswith(f"{kind}_") and value is not None}
        span = _span(kind, {k: v.lower() for k, v in parts.items()}, now.astimezone(zone).date())
        if span is not None:
            first, last = span  # local days, both inclusive
            start, end = _midnight(first, zone), _midnight(last + timedelta(days=1), zone)
            return TimeRange(start=start, end=end, phrase=match.group(0))
    return None


def _midnight(day: date, zone: ZoneInfo) -> datetime:
    if day <= date.min + timedelta(days=1):
        return EARLIEST
    if day >= date.max - timedelta(days=1):
        return LATEST
    return datetime.combine(day, time(0), zone).astimezone(UTC)


def _month_span(year: int, month: int) -> tuple[date, date]:
    first = date(year, month, 1)
    following = date(year + month // 12, month % 12 + 1, 1)
    return first, following - timedelta(days=1)


def _span(kind: str, parts: dict[str, str], today: date) -> tuple[date, date] | None:
    """The first and last local day a phrase names."""
    if kind == "ago":
        word = " ".join(parts["n"].split())
        n = int(word) if word.isdigit() else NUMBERS[word]
        unit = parts["unit"]
        if unit == "day":
            day = today - timedelta(days=n)
            return day - timedelta(days=1), day + timedelta(days=1)  # people round a day or so
        if unit == "week":
            monday = today - timedelta(days=today.weekday() + 7 * n)
            return monday, monday + timedelta(days=6)
        if unit == "month":
            index = today.year * 12 + today.month - 1 - n
            return _month_span(index // 12, index % 12 + 1)
        year = today.year - n
        return (date(year, 1, 1), date(year, 12, 31)) if year >= 1 else None
    if kind == "day_before":
        return today - timedelta(days=2), today - timedelta(days=2)
    if kind == "yesterday":
        return today - timedelta(days=1), today - timedelta(days=1)
    if kind == "today":
        return today, today
    if kind == "weekday":
        back = (today.weekday() - WEEKDAYS.index(parts["weekday"])) % 7 or 7
        return today - timedelta(days=back), today - timedelta(days=back)
    if kind == "relative":
        return _relative(parts["which"], parts["unit"], today)
    if kind in ("month_day", "day_month"):
        month, day = MONTHS[parts["month"]], int(parts["day"])
        year = int(parts["year"]) if "year" in parts else _last_year_with(month, today, day)
        try:
            moment = date(year, month, day)
        except ValueError:
            return None
        return moment, moment
    if kind == "month":
        month = MONTHS[parts["month"]]
        year = int(parts["year"]) if "year" in parts else _last_year_with(month, today)
        first, last = _month_span(year, month)
        return _edged(" ".join(parts["edge"].split()), first, last, today)
    if kind == "year":
        year = int(parts["year"])
        return _edged(" ".join(parts["edge"].split()), date(year, 1, 1), date(year, 12, 31), today)
    return None


def _last_year_with(month: int, today: date, day: int = 1) -> int:
    """The year of the last such month (or day) that has begun."""
    return today.year if (month, day) <= (today.month, today.day) else today.year - 1


def _edged(edge: str, first: date, last: date, today: date) -> tuple[date, date]:
    """A month or year, or the time since, before or after it."""
    if edge == "since":
        return first, max(today, last)
    if edge in ("before", "until"):
        return date.min, first - timedelta(days=1)
    if edge == "after":
        return last + timedelta(days=1), date.max
    return first, last


def _relative(which: str, unit: str, today: date) -> tuple[date, date]:
    if which == "past":  # the rolling span: the past week is the last seven days
        days = {"weekend": 3, "week": 7, "month": 31, "year": 365}[unit]
        return today - timedelta(days=days), today
    step = {"last": -1, "this": 0, "next": 1}[which]
    monday = today - timedelta(days=today.weekday()) + timedelta(weeks=step)
    if unit == "weekend":
        return monday + timedelta(days=5), monday + timedelta(days=6)
    if unit == "week":
        return monday, monday + timedelta(days=6)
    if unit == "month":
        index = today.year * 12 + today.month - 1 + step
        return _month_span(index // 12, index % 12 + 1)
    year = today.year + step
    return date(year, 1, 1), date(year, 12, 31)


_ANCHOR = re.compile(r"\b(?P<edge>before|after|since)\s+(?:the|my|our|his|her|their|your)\s+"
                     r"(?P<what>[^\W\d_]{3,}(?:\s+[^\W\d_]{3,})?)", re.IGNORECASE)


@dataclass(frozen=True)
class Anchor:
    """A time a text names by something that happened: ``edge`` ("before", "after", "since") and what (the move)."""

    edge: str
    what: str
    phrase: str

    def around(self, moment: datetime) -> TimeRange:
        """The span the phrase names once ``moment``, when what it names happened, is known (the moment itself, the
        memory that tells of it, in neither)."""
        if self.edge == "before":
            return TimeRange(start=EARLIEST, end=moment, phrase=self.phrase)
        return TimeRange(start=moment + timedelta(microseconds=1), end=LATEST, phrase=self.phrase)


def anchor(text: str) -> Anchor | None:
    """The first "before/after/since the <something>" of ``text`` whose something is no time phrase of its own."""
    for match in _ANCHOR.finditer(text):
        what = match.group("what")
        if _FINDER.search(match.group(0)) is None and not any(word.lower() in _TIME_WORDS for word in what.split()):
            return Anchor(edge=match.group("edge").lower(), what=what, phrase=match.group(0))
    return None


_TIME_WORDS = {"day", "days", "week", "weeks", "weekend", "month", "months", "year", "years", "morning", "evening",
               "night", "time", "summer", "winter", "spring", "autumn", "fall", *MONTHS, *WEEKDAYS}
