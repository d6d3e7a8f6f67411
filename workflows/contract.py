"""What talking to CompanionWorkflow takes, without importing it (and with it every activity's libraries): its type
name, its id, its search attribute, and the names of its signals, queries and updates. Clients start in a fraction of
a second; the workflow declares its handlers under these names."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

WORKFLOW_TYPE = "CompanionWorkflow"
WORKFLOW_ID_PREFIX = "companion-user-"
USER_ID_ATTRIBUTE = SearchAttributeKey.for_int("CompanionUserId")

# Signals
MESSAGE = "message"
WAKE = "wake"
# Queries
STATE = "state"
NUDGES = "nudges"
# Updates
SEND = "send"
SCHEDULE_NUDGE = "schedule_nudge"
CANCEL_NUDGE = "cancel_nudge"
SET_CHECKINS = "set_checkins"
SET_TIMEZONE = "set_timezone"
FORGET = "forget"
MEMORY = "memory"
FORGET_ITEM = "forget_item"
EXPORT = "export"
PERSONA = "persona"
USAGE = "usage"


def workflow_id(telegram_id: int) -> str:
    """The id of a user's workflow."""
    return f"{WORKFLOW_ID_PREFIX}{telegram_id}"


def telegram_id_of(workflow_id: str) -> int | None:
    """The Telegram id of the user whose workflow this is; None for another workflow."""
    number = workflow_id.removeprefix(WORKFLOW_ID_PREFIX)
    return int(number) if number != workflow_id and number.lstrip("-").isdigit() else None
