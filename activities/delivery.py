"""Activities of reaching the user: delivering stored messages to Telegram, noting who is out of reach, forgetting.

Delivery is at-least-once like every activity, so it records its progress: a retry (after flood control, say)
sends only the parts of a long reply that had not gone out yet.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.sending import TelegramSender
from activities.turn import TurnActivities
from core.errors import ConfigurationError, UserNotFoundError
from core.logging import get_logger
from schemas.turn import DeliverInput, Delivery, ForgetInput, Forgotten, SetUserActiveInput

# Delivery waits out Telegram's flood control (429 names the wait) for a while; a blocked bot is final.
TELEGRAM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["TelegramBlockedError", "ConfigurationError",
                                                        "InvalidMemoryDataError"])

_log = get_logger(__name__)


class DeliveryActivities(TurnActivities):
    """Delivery to Telegram and the user's reachability, over the injected repository and Telegram channel."""

    @activity.defn(name="deliver")
    @translate_errors
    async def deliver(self, data: DeliverInput) -> Delivery:
        """Send a stored message to the chat, split into Telegram-sized parts; a retry skips the parts sent.

        The message is claimed while it is sent (activities.sending.TelegramSender): an attempt running beside
        another waits for it, then finds its parts sent. The reply step sends the reply itself (deliver-in-reply);
        this step sends nudges, fallback replies, and a reply whose sending failed there.
        """
        parts = await self._require_sender().send(data.user_id, data.chat_id, data.message_key)
        return Delivery(parts=parts)

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

    def _require_sender(self) -> TelegramSender:
        if self._sender is None:
            raise ConfigurationError("this worker has no TELEGRAM_BOT_TOKEN, so it cannot deliver to Telegram")
        return self._sender

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [*super().all(), self.deliver, self.set_user_active, self.forget_user]

