"""Activities of reaching the user: delivering stored messages to Telegram, noting who is out of reach, forgetting.

Delivery is at-least-once like every activity, so it records its progress: a retry (after flood control, say)
sends only the parts of a long reply that had not gone out yet.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.telegram import TelegramChannel, split_message
from activities.turn import TurnActivities
from core.errors import ConfigurationError, DeliveryInProgressError, InvalidMemoryDataError, UserNotFoundError
from core.logging import get_logger
from schemas.memory import MessageRead
from schemas.turn import DeliverInput, Delivery, ForgetInput, Forgotten, SetUserActiveInput

# Meta keys of a stored message: how many of its Telegram parts were sent; until when an attempt sending them holds
# it (no attempt outlives TELEGRAM_TIMEOUT, so neither does a claim a lost worker left behind).
PARTS_SENT = "telegram_parts_sent"
DELIVERY_CLAIM = "telegram_delivery_claimed_until"
# Delivery waits out Telegram's flood control (429 names the wait) for a while; a blocked bot is final.
TELEGRAM_TIMEOUT = timedelta(seconds=30)
TELEGRAM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["TelegramBlockedError", "ConfigurationError",
                                                        "InvalidMemoryDataError"])
# An attempt that finds the message claimed waits this long for the claim to end (the other attempt finishing its
# send), looking every CLAIM_POLL. A claim still held after that is one a lost worker left behind: the attempt fails,
# and its retry comes when the claim lapses, not at the next backoff step (which would spend the retries).
CLAIM_WAIT = timedelta(seconds=2)
CLAIM_POLL = timedelta(seconds=0.2)

_log = get_logger(__name__)


class DeliveryActivities(TurnActivities):
    """Delivery to Telegram and the user's reachability, over the injected repository and Telegram channel."""

    @activity.defn(name="deliver")
    @translate_errors
    async def deliver(self, data: DeliverInput) -> Delivery:
        """Send a stored message to the chat, split into Telegram-sized parts; a retry skips the parts sent.

        The message is claimed while it is sent: an attempt running beside another (a workflow task taken over
        while the first worker still sends) waits for it and then finds its parts sent, instead of sending them
        again. Progress is recorded even when the attempt is cancelled right after Telegram took a part.
        """
        telegram = self._require_telegram()
        stored, claimed = await self._claim(data)
        context = {"user_id": data.user_id, "message_key": data.message_key}
        if stored is None:
            raise InvalidMemoryDataError(f"no stored message {data.message_key} to deliver", context=context)
        if not claimed:
            raise DeliveryInProgressError(f"another attempt is delivering {data.message_key}",
                                          context={**context, "retry_after_s": _claim_left_s(stored)})
        parts = split_message(stored.content)
        sent = done = int(stored.meta.get(PARTS_SENT, 0))
        try:
            for index in range(sent, len(parts)):
                await telegram.send(data.chat_id, parts[index])
                done = index + 1
                if done < len(parts):
                    await asyncio.shield(self._repository.update_message_meta(data.user_id, data.message_key,
                                                                              {PARTS_SENT: done}))
        finally:
            await asyncio.shield(self._repository.release_message(data.user_id, data.message_key, DELIVERY_CLAIM,
                                                                  {PARTS_SENT: done}))
        _log.info("telegram.delivered", user_id=data.user_id, message_key=data.message_key, parts=len(parts),
                  resumed_at=sent, attempt=activity.info().attempt)
        return Delivery(parts=len(parts))

    async def _claim(self, data: DeliverInput) -> tuple[MessageRead | None, bool]:
        """Claim the message, waiting up to CLAIM_WAIT for another attempt's claim to end."""
        deadline = asyncio.get_running_loop().time() + CLAIM_WAIT.total_seconds()
        while True:
            stored, claimed = await self._repository.claim_message(data.user_id, data.message_key, DELIVERY_CLAIM,
                                                                   TELEGRAM_TIMEOUT)
            if stored is None or claimed or asyncio.get_running_loop().time() >= deadline:
                return stored, claimed
            await asyncio.sleep(CLAIM_POLL.total_seconds())

    @activity.defn(name="set_user_active")
    @translate_errors
    async def set_user_active(self, data: SetUserActiveInput) -> int:
        """Mark the user reachable or not; returns how many pending nudges were cancelled."""
        cancelled = await self._repository.set_user_active(data.user_id, data.active, data.reason)
        _log.info("user.reachability", user_id=data.user_id, active=data.active, nudges_cancelled=cancelled)
        return cancelled

    @activity.defn(name="forget_user")
    @translate_errors
    async def forget_user(self, data: ForgetInput) -> Forgotten:
        """Erase the user's vectors, then their row and, by cascade, every memory and nudge record of them.

        Vectors go first: if the store fails, the activity is retried with the rows still there to find them by.
        """
        if self._memory is not None:
            try:
                user = await self._repository.get_user_by_telegram_id(data.telegram_id)
            except UserNotFoundError:
                user = None
            if user is not None:
                await self._memory.forget_user(user.id)
        had_memories = await self._repository.delete_user_by_telegram_id(data.telegram_id)
        _log.info("user.forgotten", telegram_id=data.telegram_id, had_memories=had_memories)
        return Forgotten(had_memories=had_memories)

    def _require_telegram(self) -> TelegramChannel:
        if self._telegram is None:
            raise ConfigurationError("this worker has no TELEGRAM_BOT_TOKEN, so it cannot deliver to Telegram")
        return self._telegram

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [*super().all(), self.deliver, self.set_user_active, self.forget_user]


def _claim_left_s(stored: MessageRead) -> float:
    """Seconds until another attempt's claim on ``stored`` lapses, by this worker's clock (a retry that comes early
    waits again): at least one, at most the lease."""
    until = stored.meta.get(DELIVERY_CLAIM)
    if until is None:  # released since this attempt found it claimed
        return 1.0
    left = (datetime.fromisoformat(until) - datetime.now(UTC)).total_seconds() + CLAIM_POLL.total_seconds()
    return min(max(left, 1.0), TELEGRAM_TIMEOUT.total_seconds())
