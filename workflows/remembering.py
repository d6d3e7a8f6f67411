"""Which turns a conversation's next remember step takes, and when: workflow state, no I/O."""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from schemas.turn import REMEMBER_BATCH_TURNS, CompanionState


class RememberQueue:
    """Turns answered and not yet remembered (message keys, oldest first), and whether a remember step runs.

    One step runs at a time. The turns answered meanwhile wait for the next, which starts once the user has been
    quiet for remember_after_quiet_s (0: at once) or REMEMBER_BATCH_TURNS turns wait: a conversation in full flow is
    remembered in a few steps, a burst of messages costs one embeddings call and one extraction.
    """

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.running = False

    def waits(self, state: CompanionState) -> bool:
        """Turns wait for a step that no running step holds up."""
        return bool(self.waiting) and not self.running and state.user_id is not None

    def due(self, state: CompanionState, now: datetime) -> bool:
        """Whether the waiting turns are to be remembered now."""
        return self.until_due(state, now) == timedelta(0)

    def until_due(self, state: CompanionState, now: datetime) -> timedelta | None:
        """How long until the waiting turns are to be remembered; None when no step waits for a time to come."""
        if not self.waits(state):
            return None
        if len(self.waiting) >= REMEMBER_BATCH_TURNS or state.last_turn_at is None:
            return timedelta(0)
        return max(state.last_turn_at + timedelta(seconds=state.remember_after_quiet_s) - now, timedelta(0))

    def take(self) -> list[str]:
        """The waiting turns, for a step that starts now."""
        turns, self.waiting = self.waiting, []
        self.running = True
        return turns
