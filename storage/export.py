"""Everything the companion keeps of a user, from one list of their tables: what /export hands them and what /forget
erases are the same rows.

The export is a JSON document (schema-versioned: EXPORT_SCHEMA) with the user's row and every row of theirs in each
table of USER_TABLES, superseded facts included, memories without their vectors; and a Markdown transcript of the
conversation in their time zone.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from schemas.memory import Role, display_name
from storage.models import (
    Base,
    Conversation,
    DiaryEntry,
    Memory,
    ProfileFact,
    ScheduledMessage,
    TimelineEvent,
    Usage,
    User,
)

EXPORT_SCHEMA = "companion-export/1"
# Every table that holds rows of a user (by user_id), in the order an export lists them. /forget deletes these rows,
# then the user's; tests check that no table with a user_id is missing from it.
USER_TABLES: tuple[type[Base], ...] = (Conversation, ProfileFact, TimelineEvent, DiaryEntry, ScheduledMessage, Memory)
# Columns an export leaves out: the vectors and the search index made of a memory's text (the text itself is in it).
LEFT_OUT = {"embedding", "word_vectors", "search", "ann_indexed"}


async def user_export(session: AsyncSession, telegram_id: int, now: datetime) -> dict[str, Any] | None:
    """The export of the user with this Telegram id, as a JSON-ready dict; None when there is no such user."""
    user = (await session.execute(select(User).where(User.telegram_id == telegram_id))).scalar_one_or_none()
    if user is None:
        return None
    tables = {}
    for model in USER_TABLES:
        rows = (await session.execute(select(model).where(model.user_id == user.id).order_by(model.id))).scalars()
        tables[model.__tablename__] = [_row(row) for row in rows]
    # What their model calls used and cost: counts only, by Telegram id (kept after /forget; see models.Usage).
    used = (await session.execute(select(Usage).where(Usage.telegram_id == telegram_id).order_by(Usage.id))).scalars()
    tables[Usage.__tablename__] = [_row(row) for row in used]
    return {"schema": EXPORT_SCHEMA, "exported_at": now.isoformat(), "user": _row(user), "tables": tables}


def export_json(export: dict[str, Any]) -> bytes:
    """The export as the file the user gets."""
    return json.dumps(export, ensure_ascii=False, indent=2).encode()


def transcript_markdown(export: dict[str, Any]) -> bytes:
    """The conversation of an export, readable: one heading a day, each message with its time, in the user's zone."""
    user = export["user"]
    zone = ZoneInfo(user["timezone"])
    name = display_name(user["first_name"], user["last_name"], user["username"], user["telegram_id"])
    lines = ["# Your conversation with the companion", "",
             f"Exported {datetime.fromisoformat(export['exported_at']).astimezone(zone):%Y-%m-%d %H:%M} "
             f"({user['timezone']}).", ""]
    day: date | None = None
    for message in sorted(export["tables"][Conversation.__tablename__], key=lambda m: (m["sent_at"], m["id"])):
        at = datetime.fromisoformat(message["sent_at"]).astimezone(zone)
        if at.date() != day:
            day = at.date()
            lines += [f"## {day:%A %d %B %Y}", ""]
        who = name if message["role"] == Role.USER.value else "companion"
        lines += [f"**{at:%H:%M} {who}:** {message['content']}", ""]
    return "\n".join(lines).encode()


def _row(row: Base) -> dict[str, Any]:
    return {column.key: _plain(getattr(row, column.key)) for column in row.__table__.columns
            if column.key not in LEFT_OUT}


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, (datetime, date)) else value
