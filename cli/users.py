"""`companion users`: operators change what a user set for themselves, such as their time zone."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cli.conversation import connect_or_explain, open_repository
from core.errors import InvalidArgumentError, UnknownTimezoneError, UserNotFoundError
from core.settings import Settings
from core.zones import zone_named
from schemas.memory import UNLIMITED
from schemas.turn import ChatUser, TimezoneChange, TimezoneSource
from workflows.client import forget, set_timezone


async def set_user(settings: Settings, telegram_id: int, timezone: str | None,
                   unlimited: bool | None = None) -> int:
    """`companion users set`: --timezone through the user's workflow, which moves their reminders with it;
    --unlimited / --limited in the user's row, which every turn reads when a limit may apply."""
    if timezone is None and unlimited is None:
        raise InvalidArgumentError("say what to set: --timezone ZONE, --unlimited or --limited")
    if unlimited is not None:
        await _set_unlimited(settings, telegram_id, unlimited)
    if timezone is None:
        return 0
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


async def forget_user(settings: Settings, telegram_id: int, confirmed: bool) -> int:
    """`companion forget --user ID --yes`: what /forget does, for an operator."""
    if not confirmed:
        raise InvalidArgumentError(f"this erases everything remembered of user {telegram_id} for good: add --yes")
    client = await connect_or_explain(settings)
    forgotten = await forget(client, settings, ChatUser(telegram_id=telegram_id))
    print(f"user {telegram_id}: erased ({'memories too' if forgotten.had_memories else 'no memories'}), "
          f"{forgotten.nudges_cancelled} planned messages cancelled, {forgotten.runs_deleted} closed workflow runs "
          "deleted from Temporal")
    return 0


async def _set_unlimited(settings: Settings, telegram_id: int, unlimited: bool) -> None:
    async with open_repository(settings) as repository:
        try:
            user = await repository.get_user_by_telegram_id(telegram_id)
        except UserNotFoundError:
            raise InvalidArgumentError(f"--user: no user {telegram_id} yet (they have not written)") from None
        await repository.set_preferences(user.id, {UNLIMITED: True if unlimited else None})
    print(f"user {telegram_id}: {'no limits' if unlimited else 'the limits apply'}")
