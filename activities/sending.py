"""Sending a stored message to a Telegram chat once: claimed while it is sent, its progress recorded part by part.

The deliver step sends replies, fallback replies and nudges through TelegramSender, so a retry, or an attempt
running beside another (a workflow task taken over while the first worker still sends), sends only the parts of a
message that had not gone out yet.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from temporalio import activity

from clients.telegram import TelegramChannel, split_message
from core.errors import DeliveryInProgressError, InvalidMemoryDataError, TelegramBlockedError
from core.logging import get_logger
from schemas.memory import MessageRead
from schemas.turn import Delivery, replied_key_of
from storage.repository import MemoryRepository

# Meta keys of a stored message: how many of its Telegram parts were sent; until when an attempt sending them holds
# it (no attempt outlives TELEGRAM_TIMEOUT, so neither does a claim a lost worker left behind).
PARTS_SENT = "telegram_parts_sent"
DELIVERY_CLAIM = "telegram_delivery_claimed_until"
# Meta key: Telegram's refusal of a chat that blocked the bot. The message is not sent there again (generate_reply
# sends a reply first; the deliver step then learns the chat blocked the bot without asking Telegram twice).
REFUSED = "telegram_refused"
# Meta key of a user's message in a group: the ids of the messages that showed the reply to it while it was written
# (activities.reply.EditPreview), one per part. Delivering the reply edits them instead of sending it again.
PREVIEW_MESSAGES = "telegram_preview_messages"
TELEGRAM_TIMEOUT = timedelta(seconds=30)
# An attempt that finds the message claimed waits this long for the claim to end (the other attempt finishing its
# send), looking every CLAIM_POLL. A claim still held after that is one a lost worker left behind: the attempt fails,
# and its retry comes when the claim lapses, not at the next backoff step (which would spend the retries).
CLAIM_WAIT = timedelta(seconds=2)
CLAIM_POLL = timedelta(seconds=0.2)

_log = get_logger(__name__)


class TelegramSender:
    """Sends the messages of one repository through one Telegram channel."""

    def __init__(self, repository: MemoryRepository, telegram: TelegramChannel):
        self._repository = repository
        self._telegram = telegram

    async def send(self, user_id: int, chat_id: int, message_key: str, held: MessageRead | None = None
                   ) -> Delivery:
        """Send the stored message ``message_key``, split into Telegram-sized parts, skipping the parts sent before;
        returns how many parts it took and how many of them this call sent. ``held``: the message as the caller
        stored it, claimed in the same statement (MemoryRepository.add_claimed_message).

        An attempt running beside another (a workflow task taken over while the first worker still sends) waits for
        it and then finds its parts sent, instead of sending them again. Progress is recorded even when the attempt
        is cancelled right after Telegram took a part.
        """
        context = {"user_id": user_id, "message_key": message_key}
        stored, claimed = (held, True) if held is not None else await self._claim(user_id, message_key)
        if stored is None:
            raise InvalidMemoryDataError(f"no stored message {message_key} to deliver", context=context)
        if not claimed:
            raise DeliveryInProgressError(f"another attempt is delivering {message_key}",
                                          context={**context, "retry_after_s": _claim_left_s(stored)})
        parts = split_message(stored.content)
        sent = done = int(stored.meta.get(PARTS_SENT, 0))
        refused: str | None = stored.meta.get(REFUSED)
        shown = await self._previews(user_id, chat_id, message_key) if refused is None else []
        try:
            if refused is not None:  # a chat that blocked the bot is not asked again for the same message
                raise TelegramBlockedError(refused, context=context)
            for index in range(sent, len(parts)):
                if index >= len(shown) or not await self._telegram.edit(chat_id, shown[index], parts[index]):
                    await self._telegram.send(chat_id, parts[index])
                done = index + 1
                if done < len(parts):
                    await asyncio.shield(self._repository.update_message_meta(user_id, message_key,
                                                                              {PARTS_SENT: done}))
        except TelegramBlockedError as exc:
            refused = exc.message
            raise
        finally:
            await asyncio.shield(self._repository.release_message(
                user_id, message_key, DELIVERY_CLAIM, {PARTS_SENT: done, **({REFUSED: refused} if refused else {})}))
        for extra in shown[len(parts):]:  # a preview of a longer reply (an earlier attempt's) is not left behind
            await self._telegram.delete(chat_id, extra)
        _log.info("telegram.delivered", user_id=user_id, message_key=message_key, parts=len(parts), resumed_at=sent,
                  edited=min(len(shown), len(parts)), attempt=activity.info().attempt)
        return Delivery(parts=len(parts), sent=done - sent)

    async def _previews(self, user_id: int, chat_id: int, message_key: str) -> list[int]:
        """The messages that showed this reply in a group while it was written (none in a private chat, whose
        preview is a draft, nor for a nudge)."""
        replied = replied_key_of(message_key)
        if chat_id > 0 or replied is None:  # Telegram's group chats have negative ids
            return []
        message = await self._repository.get_message(user_id, replied)
        return list(message.meta.get(PREVIEW_MESSAGES, [])) if message is not None else []

    async def _claim(self, user_id: int, message_key: str) -> tuple[MessageRead | None, bool]:
        """Claim the message, waiting up to CLAIM_WAIT for another attempt's claim to end."""
        deadline = asyncio.get_running_loop().time() + CLAIM_WAIT.total_seconds()
        while True:
            stored, claimed = await self._repository.claim_message(user_id, message_key, DELIVERY_CLAIM,
                                                                   TELEGRAM_TIMEOUT)
            if stored is None or claimed or asyncio.get_running_loop().time() >= deadline:
                return stored, claimed
            await asyncio.sleep(CLAIM_POLL.total_seconds())


def _claim_left_s(stored: MessageRead) -> float:
    """Seconds until another attempt's claim on ``stored`` lapses, by this worker's clock (a retry that comes early
    waits again): at least one, at most the lease."""
    until = stored.meta.get(DELIVERY_CLAIM)
    if until is None:  # released since this attempt found it claimed
        return 1.0
    left = (datetime.fromisoformat(until) - datetime.now(UTC)).total_seconds() + CLAIM_POLL.total_seconds()
    return min(max(left, 1.0), TELEGRAM_TIMEOUT.total_seconds())
