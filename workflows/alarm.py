"""The run loop's timer: one that the loop moves when its next wake moves, without a new timer at every turn."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow


class Alarm:
    """Rings when the loop's next wake is due (a nudge, or the end of the pause a remember step waits for).

    A timer that rings no later than asked is kept: the loop, woken early, looks again and sets the next one. A turn
    usually moves the wake later (the pause starts again), so keeping the timer spares two events and two commands a
    turn; a wake that comes sooner (a nudge scheduled for earlier) cancels it and starts another.
    """

    def __init__(self) -> None:
        self._timer: asyncio.Task[None] | None = None
        self._at: datetime | None = None
        self.rang = False

    def set(self, wait: timedelta | None, why: str) -> None:
        """Ring within ``wait`` (None: no wake is due; a running timer is kept, one needless wake costs less than
        cancelling it)."""
        if wait is None:
            return
        if wait <= timedelta(0):
            self.rang = True
            return
        at = workflow.now() + wait
        if self._timer is not None and not self._timer.done() and self._at is not None and self._at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = asyncio.create_task(self._ring(wait, why))

    def clear(self) -> None:
        """Heard: the loop looks at what is due, then sets the alarm again."""
        self.rang = False

    async def _ring(self, wait: timedelta, why: str) -> None:
        await workflow.sleep(wait, summary=why)
        self.rang = True
