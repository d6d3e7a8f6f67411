"""The deliver step: a stored message (a reply, a fallback reply, a nudge) sent to the user's Telegram chat."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.sending import TelegramSender
from clients.telegram import TelegramChannel
from core.errors import ConfigurationError
from schemas.turn import DeliverInput, Delivery
from storage.repository import MemoryRepository

# Delivery waits out Telegram's flood control (429 names the wait) for a while; a blocked bot is final.
TELEGRAM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["TelegramBlockedError", "ConfigurationError",
                                                        "InvalidMemoryDataError"])


class DeliveryActivities:
    """Delivery to Telegram, over the injected repository and Telegram channel (none: this worker cannot send)."""

    def __init__(self, repository: MemoryRepository, telegram: TelegramChannel | None = None):
        self._sender = TelegramSender(repository, telegram) if telegram is not None else None

    @activity.defn(name="deliver")
    @translate_errors
    async def deliver(self, data: DeliverInput) -> Delivery:
        """Send a stored message to the chat, split into Telegram-sized parts; a retry skips the parts sent.

        The message is claimed while it is sent (activities.sending.TelegramSender): an attempt running beside
        another waits for it, then finds its parts sent.
        """
        if self._sender is None:
            raise ConfigurationError("this worker has no TELEGRAM_BOT_TOKEN, so it cannot deliver to Telegram")
        return Delivery(parts=await self._sender.send(data.user_id, data.chat_id, data.message_key))

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.deliver]
