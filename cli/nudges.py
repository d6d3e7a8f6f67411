"""`companion nudges`: operators list, schedule and cancel users' proactive messages."""

from __future__ import annotations

import re
import shutil
import uuid
from datetime import UTC, datetime, timedelta

from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from cli.conversation import connect_or_explain, open_repository
from core.errors import InvalidArgumentError, InvalidInputError, UserNotFoundError
from core.settings import Settings
from schemas.memory import NudgeStatus
from schemas.turn import Nudge
from workflows.client import cancel_nudge, schedule_nudge

_DURATION = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


MAX_AHEAD = timedelta(days=3_650)


def parse_when(at: str | None, after: str | None, now: datetime) -> datetime:
    """The instant of `--at ISO-with-offset` or `--in 2h` / `90m` / `1d12h` / `3s`."""
    if after is not None:
        parts = _DURATION.findall(after)
        if not parts or "".join(n + unit for n, unit in parts) != after.replace(" ", ""):
            raise InvalidArgumentError(f"--in {after!r}: expected a duration like 3s, 90m, 2h or 1d12h")
        try:
            delay = sum((timedelta(**{_UNITS[unit]: int(n)}) for n, unit in parts), timedelta())
        except OverflowError:
            delay = MAX_AHEAD + timedelta(days=1)
        if delay > MAX_AHEAD:
            raise InvalidArgumentError(f"--in {after!r}: at most {MAX_AHEAD.days:,} days ahead")
        return now + delay
    try:
        moment = datetime.fromisoformat(at or "")
    except ValueError:
        raise InvalidArgumentError(f"--at {at!r}: expected an ISO time like 2026-11-25T09:00+01:00") from None
    if moment.tzinfo is None:
        raise InvalidArgumentError(f"--at {at!r}: give its UTC offset, e.g. {at}+00:00, so the time is unambiguous")
    return moment


async def schedule(settings: Settings, telegram_id: int, at: str | None, after: str | None, text: str | None,
                   purpose: str | None) -> int:
    """`companion nudges schedule`: prints the new nudge's id."""
    request = Nudge(nudge_id=f"op-{uuid.uuid4().hex[:10]}", at=parse_when(at, after, datetime.now(UTC)),
                           text=text, purpose=purpose)
    client = await connect_or_explain(settings)
    try:
        nudge = await schedule_nudge(client, settings, telegram_id, request)
    except WorkflowUpdateFailedError as exc:
        raise InvalidInputError(f"not scheduled: {exc.cause}") from None
    print(f"{nudge.nudge_id}  due {nudge.at.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC "
          f"({_from_now(nudge.at - datetime.now(UTC))})")
    return 0


def _from_now(delay: timedelta) -> str:
    """A delay as people say it: in 3 s, in 2 h 5 min, in 3 days."""
    seconds = max(0, round(delay.total_seconds()))
    if seconds < 90:
        return f"in {seconds} s"
    if seconds < 90 * 60:
        return f"in {round(seconds / 60)} min"
    if seconds < 48 * 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"in {hours} h {minutes} min" if minutes else f"in {hours} h"
    return f"in {round(seconds / 86400)} days"


async def cancel(settings: Settings, telegram_id: int, nudge_id: str) -> int:
    """`companion nudges cancel`."""
    client = await connect_or_explain(settings)
    try:
        await cancel_nudge(client, telegram_id, nudge_id)
    except WorkflowUpdateFailedError as exc:
        raise InvalidInputError(f"not cancelled: {exc.cause}") from None
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise InvalidInputError(f"not cancelled: user {telegram_id} has no conversation") from None
        raise
    print(f"cancelled {nudge_id}")
    return 0


async def list_nudges(settings: Settings, telegram_id: int | None, status: str | None) -> int:
    """`companion nudges list`: the audit records, soonest first, times in each user's time zone."""
    async with open_repository(settings) as repository:
        try:
            user_id = (await repository.get_user_by_telegram_id(telegram_id)).id if telegram_id else None
        except UserNotFoundError:
            print(f"no nudges: user {telegram_id} is unknown")
            return 0
        nudges = await repository.list_scheduled_messages(user_id, NudgeStatus(status) if status else None)
        users = {uid: await repository.get_user(uid) for uid in {nudge.user_id for nudge in nudges}}
    if not nudges:
        print("no nudges")
        return 0
    rows = [("ID", "USER", "STATUS", "DUE (user's time)", "BY", "WHAT")]
    for nudge in nudges:
        user = users[nudge.user_id]
        when = nudge.scheduled_for.astimezone(user.timezone_info)
        what = nudge.content or f"({nudge.purpose or ''})"
        rows.append((nudge.nudge_id, str(user.telegram_id), nudge.status.value, f"{when:%Y-%m-%d %H:%M %Z}",
                     nudge.created_by.value, what))
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Rows under their header, columns aligned; the last column is clipped to the terminal's width."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    room = max(20, shutil.get_terminal_size().columns - sum(widths) - 2 * len(widths))
    for row in rows:
        last = " ".join(row[-1].split())
        last = last if len(last) <= room else last[:room - 1] + "…"
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), last]).rstrip())
