"""The deliver step: a stored message (a reply, a fallback reply, a nudge) sent to the user's Telegram chat; and
/export's documents."""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.sending import TelegramSender
from clients.telegram import TelegramChannel
from core.errors import ConfigurationError
from core.logging import get_logger
from schemas.turn import DeliverInput, Delivery, Exported, SendExportInput
from storage.export import export_json, transcript_markdown
from storage.repository import MemoryRepository

# Delivery waits out Telegram's flood control (429 names the wait) for a while; a blocked bot is final.
TELEGRAM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["TelegramBlockedError", "ConfigurationError",
                                                        "InvalidMemoryDataError"])


EXPORT_CAPTION = ("Everything I keep about you, as data: your messages and mine, what I learned (with what it "
                  "replaced), coming events, diary, planned messages and memories.")
TRANSCRIPT_CAPTION = "Our conversation, to read."
NOTHING_KEPT = "I keep nothing about you."

_log = get_logger(__name__)


class DeliveryActivities:
    """Delivery to Telegram, over the injected repository and Telegram channel (none: this worker cannot send)."""

    def __init__(self, repository: MemoryRepository, telegram: TelegramChannel | None = None):
        self._repository, self._telegram = repository, telegram
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
        return await self._sender.send(data.user_id, data.chat_id, data.message_key)

    @activity.defn(name="send_export")
    @translate_errors
    async def send_export(self, data: SendExportInput) -> Exported:
        """Send the user everything kept of them (/export): the JSON export and the Markdown transcript, as two
        documents; nothing is kept of it. A retried attempt sends them again."""
        if self._telegram is None:
            raise ConfigurationError("this worker has no TELEGRAM_BOT_TOKEN, so it cannot send to Telegram")
        export = await self._repository.export_user(data.telegram_id)
        if export is None:
            await self._telegram.send(data.chat_id, NOTHING_KEPT)
            return Exported(rows=0)
        day = export["exported_at"][:10]
        await self._telegram.send_document(data.chat_id, f"companion-export-{day}.json", export_json(export),
                                           EXPORT_CAPTION)
        await self._telegram.send_document(data.chat_id, f"companion-conversation-{day}.md",
                                           transcript_markdown(export), TRANSCRIPT_CAPTION)
        rows = sum(len(rows) for rows in export["tables"].values())
        _log.info("export.sent", telegram_id=data.telegram_id, rows=rows)
        return Exported(rows=rows)

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.deliver, self.send_export]
