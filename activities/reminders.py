"""Reminders and coming events a user mentions in plain words, read without an LLM.

"remind me tomorrow at 9 to call mom" is a reminder; "I have a job interview on Friday at 10" is an event the
companion follows up on. A small model can't be trusted to extract a time, so the common English phrasings are
parsed here: a relative delay ("in 2 hours", "in half an hour"), or a day (today, tonight, tomorrow, a weekday, an
ISO date) and/or a time ("at 9", "at 18:30", "at 6pm", "in the evening"). Times are the user's local wall time.
Anything else is left to the remember step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from schemas.turn import Nudge

_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "ten": 10,
            "twenty": 20, "thirty": 30}
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PARTS = {"morning": time(9), "afternoon": time(15), "evening": time(19), "night": time(20), "tonight": time(20)}
DEFAULT_TIME = time(9)

_REMIND = re.compile(r"\bremind\s+me\b", re.IGNORECASE)
_RELATIVE = re.compile(
    r"\bin\s+(?:(?P<half>half\s+an?\s+hour)|(?P<n>\d+|an?|one|two|three|four|five|six|ten|twenty|thirty)\s*"
    r"(?P<unit>m(?:in(?:ute)?s?)?|h(?:(?:ou)?rs?)?|d(?:ays?)?|w(?:eeks?)?)\b)", re.IGNORECASE)
_DAY = re.compile(r"\b(?:(?P<rel>today|tonight|tomorrow)|(?:on\s+)?(?P<weekday>" + "|".join(_WEEKDAYS) + r")"
                  r"|(?:on\s+)?(?P<iso>\d{4}-\d{2}-\d{2}))\b", re.IGNORECASE)
_CLOCK = re.compile(r"\bat\s+(?P<h>\d{1,2})(?:[:.](?P<m>\d{2}))?\s*(?P<ampm>[ap]\.?m\.?)?(?!\w)", re.IGNORECASE)
_PART = re.compile(r"\b(?:in\s+the\s+|this\s+|tomorrow\s+)?(?P<part>morning|afternoon|evening|night)\b",
                   re.IGNORECASE)
_POLITE = re.compile(r"^please\s+|[\s,]+please$", re.IGNORECASE)
_LEAD = re.compile(r"^(?:\s|[,:;-])*(?:to|that|about|of)?\s+", re.IGNORECASE)


_EVENT = re.compile(
    r"\b(?:i\s+have|i've\s+got|i\s+have\s+got|i've|there's|there\s+is)\s+(?P<what>(?:a|an|my|the)\s+[\w' -]{2,60}?)"
    r"\s+(?=(?:today|tonight|tomorrow|on\s+\w+|this\s+(?:morning|afternoon|evening))\b)"
    r"|\bmy\s+(?P<own>[\w' -]{2,60}?)\s+is\s+(?=(?:today|tonight|tomorrow|on\s+\w+)\b)", re.IGNORECASE)
FOLLOW_UP_TIME = time(10)


@dataclass(frozen=True)
class Event:
    """Something coming up in the user's life, and when (UTC)."""

    at: datetime
    what: str


def parse_event(text: str, now: datetime, zone: ZoneInfo) -> Event | None:
    """A coming event the message mentions ("I have a job interview on Friday at 10"), or None."""
    if _REMIND.search(text):
        return None  # a reminder request, not news
    found = _EVENT.search(text)
    if found is None:
        return None
    local_now = now.astimezone(zone)
    at = _calendar(text[found.end():], local_now, zone, [])
    if at is None or at <= now:
        return None
    what = re.sub(r"^(?:a|an|my|the)\s+", "", (found.group("what") or found.group("own")).strip(), flags=re.I)
    return Event(at=at, what=what)


def same_time_of_day(nudges: list[Nudge], old: ZoneInfo, new: ZoneInfo, now: datetime) -> list[Nudge]:
    """The nudges due at a time of day where the user is (``local_time``), due at that time of day in ``new`` rather
    than ``old``: 9:00 stays 9:00 where they now are. One that would then be past is due ``now``."""
    return [nudge.model_copy(update={"at": max(nudge.at.astimezone(old).replace(tzinfo=new), now)})
            for nudge in nudges if nudge.local_time]


def follow_up_time(event_at: datetime, zone: ZoneInfo) -> datetime:
    """When to ask how an event went: the next day at 10:00, the user's time."""
    day = event_at.astimezone(zone).date() + timedelta(days=1)
    return datetime.combine(day, FOLLOW_UP_TIME, tzinfo=zone).astimezone(ZoneInfo("UTC"))


@dataclass(frozen=True)
class Reminder:
    """What to remind the user of, and when (UTC): at a time of day where they are ("tomorrow at 9"), or after a
    while ("in 2 hours")."""

    at: datetime
    what: str
    local_time: bool


def parse_reminder(text: str, now: datetime, zone: ZoneInfo) -> Reminder | None:
    """The reminder a message asks for, or None when it asks for none (or names no time we can read)."""
    asked = _REMIND.search(text)
    if asked is None:
        return None
    rest = text[asked.end():]
    spans: list[tuple[int, int]] = []
    after = _relative(rest, now, spans)
    at = after or _calendar(rest, now.astimezone(zone), zone, spans)
    if at is None:
        return None
    what = _what(rest, spans)
    return Reminder(at=at, what=what, local_time=after is None) if what else None


def _relative(rest: str, now: datetime, spans: list[tuple[int, int]]) -> datetime | None:
    match = _RELATIVE.search(rest)
    if match is None:
        return None
    spans.append(match.span())
    if match.group("half"):
        return now + timedelta(minutes=30)
    word = match.group("n").lower()
    count = int(word) if word.isdigit() else _NUMBERS[word]
    unit = _UNITS[match.group("unit")[0].lower()]
    return now + timedelta(**{unit: count})


def _calendar(rest: str, local_now: datetime, zone: ZoneInfo, spans: list[tuple[int, int]]) -> datetime | None:
    day_match, clock_match, part_match = _DAY.search(rest), _CLOCK.search(rest), _PART.search(rest)
    if day_match is None and clock_match is None and part_match is None:
        return None
    for match in (day_match, clock_match, part_match):
        if match is not None:
            spans.append(match.span())
    clock = _clock(clock_match) if clock_match else None
    if clock_match and clock is None:
        return None  # "at 27": not a time
    part = part_match.group("part").lower() if part_match else None
    if day_match is not None and (day_match.group("rel") or "").lower() == "tonight":
        part = "tonight"
    when = clock or (_PARTS[part] if part else DEFAULT_TIME)
    day = _day(day_match, local_now.date()) if day_match else local_now.date()
    at = datetime.combine(day, when, tzinfo=zone)
    if day_match is None and at <= local_now:
        at = datetime.combine(day + timedelta(days=1), when, tzinfo=zone)  # "at 9" said at 10 means tomorrow
    return at.astimezone(ZoneInfo("UTC"))


def _clock(match: re.Match[str]) -> time | None:
    hour, minute = int(match.group("h")), int(match.group("m") or 0)
    ampm = (match.group("ampm") or "").lower().replace(".", "")
    if ampm == "pm" and hour < 12:
        hour += 12
    elif ampm == "am" and hour == 12:
        hour = 0
    elif not ampm and 1 <= hour <= 6:
        hour += 12  # "at 5" is teatime more often than dawn
    if hour > 23 or minute > 59:
        return None
    return time(hour, minute)


def _day(match: re.Match[str], today: date) -> date:
    if match.group("iso"):
        return date.fromisoformat(match.group("iso"))
    relative = (match.group("rel") or "").lower()
    if relative == "tomorrow":
        return today + timedelta(days=1)
    if relative in ("today", "tonight"):
        return today
    ahead = (_WEEKDAYS.index(match.group("weekday").lower()) - today.weekday()) % 7
    return today + timedelta(days=ahead or 7)  # "on Friday" said on a Friday means next week


def _what(rest: str, spans: list[tuple[int, int]]) -> str:
    kept, position = [], 0
    for start, end in sorted(spans):
        kept.append(rest[position:start])
        position = max(position, end)
    kept.append(rest[position:])
    what = " ".join(" ".join(kept).split())
    what = _LEAD.sub("", " " + what).strip(" ,.;:!?-")
    what = _POLITE.sub("", what).strip(" ,.;:!?-")
    return re.sub(r"\s+([,.;:!?])", r"\1", what)
