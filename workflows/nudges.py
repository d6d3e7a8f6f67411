"""A conversation's nudges as its workflow keeps them: the pending ones, soonest first, and the ids of those done.

Plain functions over the workflow's state, so that the workflow reads as its steps; the timers and the audit
records are the workflow's.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from schemas.memory import NudgeCreator, NudgeKind
    from schemas.turn import MAX_PENDING_NUDGES, CompanionState, Nudge

DONE_NUDGES_KEPT = 100
CHECKIN_SLACK = timedelta(hours=1)
CHECKIN_PURPOSE = ("check in with the user, who has not written for a few days: ask how they are, picking up "
                   "something they told you")


def refusal(state: CompanionState, nudge: Nudge, now: datetime) -> str | None:
    """Why ``nudge`` cannot be scheduled, or None."""
    if nudge.at <= now:
        return f"the time {nudge.at.isoformat()} is in the past"
    if nudge.text is None and nudge.purpose is None:
        return "a nudge needs its text or a purpose"
    if pending(state, nudge.nudge_id) or nudge.nudge_id in state.done_nudges:
        return f"nudge {nudge.nudge_id} exists already"
    if len(state.nudges) >= MAX_PENDING_NUDGES:
        return f"this user has {MAX_PENDING_NUDGES} pending nudges; cancel some first"
    if state.blocked:
        return "this user has blocked the bot; nothing can reach them until they write again"
    return None


def cancel_refusal(state: CompanionState, nudge_id: str) -> str | None:
    """Why the nudge ``nudge_id`` cannot be cancelled, or None."""
    if nudge_id in state.done_nudges:
        return f"nudge {nudge_id} is not pending any more: it was sent or cancelled already"
    if pending(state, nudge_id) is None:
        return f"this user has no nudge {nudge_id}"
    return None


def pending(state: CompanionState, nudge_id: str) -> Nudge | None:
    """The pending nudge with this id."""
    return next((nudge for nudge in state.nudges if nudge.nudge_id == nudge_id), None)


def add(state: CompanionState, nudge: Nudge) -> None:
    """Pending, in order of time."""
    state.nudges = sorted([*state.nudges, nudge], key=lambda waiting: waiting.at)


def move(state: CompanionState, moved: list[Nudge]) -> None:
    """Pending nudges at new times (same ids), in order of time."""
    new = {nudge.nudge_id: nudge for nudge in moved}
    state.nudges = sorted((new.get(nudge.nudge_id, nudge) for nudge in state.nudges), key=lambda waiting: waiting.at)


def drop(state: CompanionState, nudge_ids: list[str], outcome: str | None) -> None:
    """Out of the pending list and into the done ones (sent, cancelled, failed or replaced: never again), counted
    by ``outcome``."""
    state.nudges = [nudge for nudge in state.nudges if nudge.nudge_id not in nudge_ids]
    state.done_nudges = [*state.done_nudges, *nudge_ids][-DONE_NUDGES_KEPT:]
    if outcome is not None and nudge_ids:
        count(outcome, len(nudge_ids))


def due(state: CompanionState, now: datetime) -> Nudge | None:
    """The first nudge whose time has come."""
    return next((nudge for nudge in state.nudges if nudge.at <= now), None)


def until_next(state: CompanionState, now: datetime) -> timedelta | None:
    """How long until the next nudge is due; None without one."""
    return max(state.nudges[0].at - now, timedelta(0)) if state.nudges else None


def next_checkin(state: CompanionState, now: datetime, nudge_id: str) -> tuple[Nudge | None, Nudge] | None:
    """(the check-in it replaces, the check-in N days after ``now``), or None when none is to be planned: the user
    turned them off or blocked the bot, or the pending one is due within the hour's slack anyway (a chat in full
    flow moves its check-in once an hour, not at every message)."""
    days = state.checkin_after_days
    if not state.checkins or state.blocked or days <= 0:
        return None
    old = next((nudge for nudge in state.nudges if nudge.kind == NudgeKind.CHECK_IN), None)
    at = now + timedelta(days=days)
    if (old is not None and at - old.at < CHECKIN_SLACK) or (old is None and len(state.nudges) >= MAX_PENDING_NUDGES):
        return None
    return old, Nudge(nudge_id=nudge_id, at=at, purpose=CHECKIN_PURPOSE, kind=NudgeKind.CHECK_IN,
                      created_by=NudgeCreator.COMPANION)


def count(outcome: str, value: int = 1) -> None:
    """Nudges leaving the pending list, or postponed, as a workflow metric (not emitted again on replay)."""
    workflow.metric_meter().create_counter(
        "companion_nudges", "nudges leaving the pending list (sent, cancelled, failed, replaced) or postponed",
    ).add(value, {"outcome": outcome})
