"""The rules behind nudges, as pure functions: quiet hours in local time, and reading reminders from a message."""

from __future__ import annotations

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from activities.nudges import quiet_until
from activities.reminders import follow_up_time, parse_event, parse_reminder


@pytest.mark.parametrize(("local", "until"), [
    ("2026-11-24T21:59", None), ("2026-11-24T22:00", "2026-11-25T08:00"), ("2026-11-25T03:10", "2026-11-25T08:00"),
    ("2026-11-25T08:00", None), ("2026-03-29T01:30", "2026-03-29T08:00"),  # the night clocks go forward in Paris
])
def test_quiet_until_reads_local_wall_time(local: str, until: str | None) -> None:
    paris = ZoneInfo("Europe/Paris")
    now = datetime.fromisoformat(local).replace(tzinfo=paris)
    expected = None if until is None else datetime.fromisoformat(until).replace(tzinfo=paris)
    assert quiet_until(now.astimezone(UTC), paris, (time(22), time(8))) == expected


# Tuesday 24 November 2026, 10:00 in Paris.
PARIS = ZoneInfo("Europe/Paris")
NOW = datetime(2026, 11, 24, 10, 0, tzinfo=PARIS).astimezone(UTC)


@pytest.mark.parametrize(("message", "local", "what"), [
    ("remind me tomorrow at 9 to call mom", "2026-11-25T09:00", "call mom"),
    ("Remind me to call mom tomorrow at 9am", "2026-11-25T09:00", "call mom"),
    ("can you remind me in 2 hours to stretch?", "2026-11-24T12:00", "stretch"),
    ("remind me in half an hour to take the cake out", "2026-11-24T10:30", "take the cake out"),
    ("remind me in 3 days that the rent is due", "2026-11-27T10:00", "the rent is due"),
    ("please remind me at 18:30 to water the plants", "2026-11-24T18:30", "water the plants"),
    ("remind me at 8 to walk the dog", "2026-11-25T08:00", "walk the dog"),  # 8:00 has passed today
    ("remind me at 5 to leave for the station", "2026-11-24T17:00", "leave for the station"),
    ("remind me on Friday at 10am about the dentist", "2026-11-27T10:00", "the dentist"),
    ("remind me on tuesday to buy flowers", "2026-12-01T09:00", "buy flowers"),  # today is Tuesday
    ("remind me tonight to pack", "2026-11-24T20:00", "pack"),
    ("please remind me tomorrow to book the train, please!", "2026-11-25T09:00", "book the train"),
    ("remind me tomorrow morning to send the form", "2026-11-25T09:00", "send the form"),
    ("remind me on 2026-12-24 at 4pm to wrap presents", "2026-12-24T16:00", "wrap presents"),
])
def test_common_reminder_phrasings_are_read_in_local_time(message: str, local: str, what: str) -> None:
    reminder = parse_reminder(message, NOW, PARIS)
    assert reminder is not None
    assert reminder.at == datetime.fromisoformat(local).replace(tzinfo=PARIS)
    assert reminder.what == what


@pytest.mark.parametrize("message", [
    "I have a dentist appointment tomorrow at 9",  # no request
    "remind me to call mom",  # no time we can read
    "remind me at 27 to sleep",  # no such hour
    "remind me tomorrow",  # nothing to be reminded of
])
def test_messages_without_a_readable_reminder_give_none(message: str) -> None:
    assert parse_reminder(message, NOW, PARIS) is None


@pytest.mark.parametrize(("message", "local", "what"), [
    ("I have a job interview on Friday at 10", "2026-11-27T10:00", "job interview"),
    ("i've got a dentist appointment tomorrow, ugh", "2026-11-25T09:00", "dentist appointment"),
    ("My sister's wedding is on 2026-12-12!", "2026-12-12T09:00", "sister's wedding"),
    ("I have my driving test tomorrow at 2pm", "2026-11-25T14:00", "driving test"),
])
def test_coming_events_are_read_with_their_day(message: str, local: str, what: str) -> None:
    event = parse_event(message, NOW, PARIS)
    assert event is not None
    assert (event.at, event.what) == (datetime.fromisoformat(local).replace(tzinfo=PARIS), what)
    follow_up = follow_up_time(event.at, PARIS).astimezone(PARIS)
    assert (follow_up.date() - event.at.date()).days == 1 and follow_up.hour == 10


@pytest.mark.parametrize("message", [
    "I had a job interview yesterday",  # past
    "remind me tomorrow at 9 to call mom",  # a reminder, not news
    "I have a cat",  # no time
])
def test_messages_without_a_coming_event_give_none(message: str) -> None:
    assert parse_event(message, NOW, PARIS) is None
