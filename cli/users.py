"""`companion users`: operators change what a user set for themselves, such as their time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cli.conversation import connect_or_explain
from core.errors import InvalidArgumentError, UnknownTimezoneError
from core.settings import Settings
from core.zones import zone_named
from schemas.turn import ChatUser, TimezoneChange, TimezoneSource
from workflows.client import set_timezone


async def set_user(settings: Settings, telegram_id: int, timezone: str) -> int:
    """`companion users set --timezone`: through the user's workflow, which moves their reminders with it."""
    try:
        zone = zone_named(timezone)
    except UnknownTimezoneError as exc:
        raise InvalidArgumentError(f"--timezone: {exc}") from None
    client = await connect_or_explain(settings)
    changed = await set_timezone(client, settings, ChatUser(telegram_id=telegram_id),
                                 TimezoneChange(zone=zone, source=TimezoneSource.OPERATOR))
    local = datetime.now(UTC).astimezone(ZoneInfo(changed.zone))
    print(f"user {telegram_id}: time zone {changed.zone} (was {changed.previous}; {local:%H:%M} there now)")
    for nudge in changed.moved:
        print(f"  moved {nudge.nudge_id} to {nudge.at.astimezone(ZoneInfo(changed.zone)):%Y-%m-%d %H:%M %Z}")
    return 0
