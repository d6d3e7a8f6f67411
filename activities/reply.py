"""generate_reply: the LLM's reply to one stored message, written once and stored under its key.

A regular activity on the LLM task queue (`<task queue>-llm`): its rate limit there holds across every worker, it
heartbeats while the model thinks, and the workflow answers queries and updates meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, datetime, timedelta

from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.prompt import HISTORY_TURNS, RECALL_K, build_prompt, fit_memory
from activities.sending import DELIVERY_CLAIM, PREVIEW_MESSAGES, TELEGRAM_TIMEOUT, TelegramSender
from activities.usage import UsageRecorder, records_usage
from clients.llm import ChatModel, PromptBudget
from clients.telegram import TelegramChannel, split_message
from core.concurrency import alongside
from core.errors import CompanionError
from core.logging import get_logger
from schemas.context import UserContextSchema
from schemas.memory import Channel, MessageCreate, MessageRead, Role
from schemas.turn import (
    GeneratedReply,
    GenerateReplyInput,
    ReplyPreviewChunk,
    TurnContext,
    reply_preview_channel,
)
from storage.recall import MemoryHit, MemoryIndex
from storage.repository import MemoryRepository

# Each attempt may be paid for: three at most, all within the turn's deadline (the workflow's schedule-to-close).
LLM_TIMEOUT = timedelta(seconds=90)
LLM_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                        maximum_interval=timedelta(seconds=10), maximum_attempts=3,
                        non_retryable_error_types=["InvalidMemoryDataError", "UserNotFoundError",
                                                   "ConfigurationError"])
# A worker that dies mid-call is noticed within LLM_HEARTBEAT and the step retried on another worker.
LLM_HEARTBEAT = timedelta(seconds=10)
HEARTBEAT_EVERY_S = 2.0
# The preview of a reply as it is written: shown this long after the model's first words (a reply done by then goes
# out whole), then renewed at most this often: a draft in a private chat; an edit in a group, where Telegram's flood
# control is stricter.
PREVIEW_AFTER_S = 0.1
DRAFT_EVERY_S = 0.4
EDIT_EVERY_S = 1.0
TERMINAL_EVERY_S = 0.05
# A notification carries at most 8,000 bytes: this many characters, JSON-encoded, fit.
NOTIFY_CHARS = 1_500

GROUP_NOTE = ("You are in a group chat: other people read your reply. Answer the message in front of you; you know "
              "nothing private about anyone here, and bring up nothing from private conversations.")

_log = get_logger(__name__)


class ReplyActivities:
    """The reply step, over an injected repository, chat model, memory index and Telegram (for "typing…")."""

    def __init__(self, repository: MemoryRepository, chat_model: ChatModel, memory: MemoryIndex | None = None,
                 telegram: TelegramChannel | None = None, usage: UsageRecorder | None = None):
        self._repository, self._usage = repository, usage
        self._chat_model = chat_model
        self._memory = memory
        self._telegram = telegram
        self._sender = TelegramSender(repository, telegram) if telegram is not None else None

    @activity.defn(name="generate_reply")
    @translate_errors
    @records_usage
    async def generate_reply(self, data: GenerateReplyInput) -> GeneratedReply:
        """Ask the LLM for the reply to the user's stored message and store it under the reply key.

        An attempt that finds the reply already stored (an earlier attempt stored it, then its completion was lost)
        returns that reply: the user gets one reply, and the paid call is not made twice.

        A Telegram reply is sent as soon as it is stored, the moment its preview ends, rather than one workflow task
        later; the deliver step that follows then finds it sent, or finishes what this step could not send.
        """
        context = await self._repository.get_user_context(data.user_id, message_limit=HISTORY_TURNS + 1)
        # The turn's reply is among the last messages when an earlier attempt stored it: a turn runs alone.
        stored = next((m for m in context.recent_messages if m.message_key == data.reply_key), None)
        if stored is not None:
            return GeneratedReply(text=stored.content)
        in_group = data.chat_id is not None and data.chat_id != context.user.telegram_id
        prompt = (_group_prompt(data, context, self._chat_model.budget) if in_group
                  else await self._prompt(data, context))
        info = activity.info()
        _log.info("llm.request", user_id=data.user_id, message_key=data.message_key, attempt=info.attempt,
                  workflow_id=info.workflow_id)
        preview = self._preview(data, context)
        async with self._typing(data), _heartbeating(), preview.running() if preview else nullcontext():
            reply = await self._chat_model.reply(prompt, data.text, on_text=preview.show if preview else None)
            if preview is not None:
                preview.end()  # the reply is stored while a part being shown finishes
            saved, held = await self._store(data, reply.text)
        await self._send_now(data, saved if held else None)
        return reply.model_copy(update={"text": saved.content})

    async def prompt_for(self, data: GenerateReplyInput) -> TurnContext:
        """The prompt the LLM gets for the message: persona, the user's quoted memory and what recall found for the
        message, the recent conversation."""
        return await self._prompt(data, await self._repository.get_user_context(data.user_id,
                                                                               message_limit=HISTORY_TURNS + 1))

    async def _prompt(self, data: GenerateReplyInput, context: UserContextSchema) -> TurnContext:
        # A new user's first turns (until a remember step has run) skip the embeddings call and the search.
        found = await self._recall(data, context) if context.has_memories else []
        context.summary = data.summary
        budget = self._chat_model.budget
        fit_memory(context, found, {m.message_key for m in context.recent_messages}, budget)
        return build_prompt(context, data.message_key, data.note, budget)

    async def _recall(self, data: GenerateReplyInput, context: UserContextSchema) -> list[MemoryHit]:
        """Memories that bear on the message (of the time it names, in the user's zone, first), best first; none
        when memory search fails (the turn goes on)."""
        if self._memory is None:
            return []
        said = next((m.sent_at for m in context.recent_messages if m.message_key == data.message_key), None)
        now, zone = said or datetime.now(UTC), context.user.timezone_info
        try:
            when = await self._memory.time_named(data.user_id, data.text, now, zone)
            # Enough candidates that dropping those made of the recent turns still leaves RECALL_K.
            found = await self._memory.search(data.user_id, data.text, k=RECALL_K + HISTORY_TURNS + 1, when=when)
        except CompanionError as exc:
            _log.warning("memory.recall_failed", user_id=data.user_id, error=exc.code, detail=exc.message)
            return []
        _log.info("memory.recalled", user_id=data.user_id, candidates=len(found.hits), degraded=found.degraded,
                  duration_ms=round(found.elapsed_ms, 1))
        return found.hits

    def _sends_now(self, data: GenerateReplyInput) -> bool:
        return data.channel == Channel.TELEGRAM and data.chat_id is not None and self._sender is not None

    async def _store(self, data: GenerateReplyInput, text: str) -> tuple[MessageRead, bool]:
        """Store the reply: (the reply as stored, whether this attempt holds it for sending). A reply sent right
        away is stored claimed for sending, in the same statement."""
        reply = MessageCreate(message_key=data.reply_key, role=Role.ASSISTANT, content=text, channel=data.channel,
                              sent_at=datetime.now(UTC))
        if not self._sends_now(data):
            return await self._repository.add_message(data.user_id, reply), False
        return await self._repository.add_claimed_message(data.user_id, reply, DELIVERY_CLAIM, TELEGRAM_TIMEOUT)

    async def _send_now(self, data: GenerateReplyInput, held: MessageRead | None) -> None:
        """Send the stored reply to its Telegram chat (``held``: stored claimed for it); what fails here (flood
        control, a blocked bot, a Telegram error) is left to the deliver step, which waits it out or marks the user
        out of reach."""
        if not self._sends_now(data):
            return
        assert data.chat_id is not None and self._sender is not None
        try:
            await self._sender.send(data.user_id, data.chat_id, data.reply_key, held)
        except CompanionError as exc:
            _log.info("telegram.send_left_to_deliver", user_id=data.user_id, message_key=data.reply_key,
                      error=exc.code, detail=exc.message)

    def _preview(self, data: GenerateReplyInput, context: UserContextSchema) -> Preview | None:
        """What shows the chat the reply as it is written: a draft in a private Telegram chat, messages edited as
        they grow in a group, the text as it comes in a terminal."""
        if not self._chat_model.streams:
            return None
        if data.channel == Channel.CONSOLE:
            return TerminalPreview(self._repository, context.user.telegram_id, data.reply_key)
        if data.channel != Channel.TELEGRAM or data.chat_id is None or self._telegram is None:
            return None
        if data.chat_id == context.user.telegram_id:
            return DraftPreview(self._telegram, data.chat_id, data.reply_key)
        message = next((m for m in context.recent_messages if m.message_key == data.message_key), None)
        sent = message.meta.get(PREVIEW_MESSAGES, []) if message is not None else []  # by an earlier attempt
        return EditPreview(self._telegram, self._repository, data.user_id, data.chat_id, data.message_key, sent)

    def _typing(self, data: GenerateReplyInput) -> AbstractAsyncContextManager[None]:
        if data.channel == Channel.TELEGRAM and data.chat_id is not None and self._telegram is not None:
            return self._telegram.typing(data.chat_id)
        return nullcontext()

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.generate_reply]


class Preview:
    """The reply as the model writes it, shown in the chat while it is written (plain text; sending the stored reply
    then makes it the formatted message, once). The text appears PREVIEW_AFTER_S after the model's first words (a reply
    written quicker goes out whole, with no preview), then changes at most every ``every_s``. It is cut into parts as
    the sent message is (clients.telegram.split_message: a part, once the text outgrows it, never changes again), so
    a long reply goes on in a part of its own. A part Telegram refuses ends the preview, never the reply."""

    every_s: float

    def __init__(self) -> None:
        self._text = ""
        self._shown: list[str] = []
        self._grew, self._closed = asyncio.Event(), asyncio.Event()

    def show(self, text: str) -> None:
        """The reply so far (called as the model's stream grows)."""
        self._text = text
        self._grew.set()

    def end(self) -> None:
        """The reply is written: no part starts showing from now on (one being shown finishes)."""
        self._closed.set()
        self._grew.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Show the reply while the block writes it. At the end, a part being shown is let finish (its message
        recorded) rather than cut off: sending the reply then finds every message the preview sent."""
        task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            self.end()
            await task

    async def _run(self) -> None:
        await self._grew.wait()
        if await self._pause(PREVIEW_AFTER_S):
            return
        while True:
            await self._grew.wait()
            self._grew.clear()
            if self._closed.is_set():
                return
            for index, part in enumerate(self._parts(self._text)):
                if self._shown[index:index + 1] != [part]:
                    if not await self._put(index, part):
                        return
                    self._shown[index:index + 1] = [part]
            if await self._pause(self.every_s):
                return

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``; True when the reply is written meanwhile (the preview is over)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
        return self._closed.is_set()

    def _parts(self, text: str) -> list[str]:
        """The reply so far, cut as it will be sent."""
        return split_message(text)

    async def _put(self, index: int, text: str) -> bool:
        """Show part ``index`` of the reply as ``text``; False when it can't be shown."""
        raise NotImplementedError


class DraftPreview(Preview):
    """The preview in a private chat: a Telegram draft (sendMessageDraft), ephemeral and animated, one per part. A
    retried attempt starts the same draft again."""

    every_s = DRAFT_EVERY_S

    def __init__(self, telegram: TelegramChannel, chat_id: int, reply_key: str):
        super().__init__()
        self._telegram, self._chat_id = telegram, chat_id
        # Non-zero and the same for every attempt at this reply: Telegram animates changes of one draft.
        self._draft_id = int(hashlib.sha256(reply_key.encode()).hexdigest()[:7], 16) | 1

    async def _put(self, index: int, text: str) -> bool:
        return await self._telegram.draft(self._chat_id, self._draft_id + 2 * index, text)


class EditPreview(Preview):
    """The preview in a group (drafts are for private chats): a message per part, sent then edited. The ids of the
    messages are stored on the user's message (PREVIEW_MESSAGES) as soon as Telegram gives them: a retried attempt
    edits the messages the first one sent, and sending the reply makes them the reply, so the chat never gets a
    second copy."""

    every_s = EDIT_EVERY_S

    def __init__(self, telegram: TelegramChannel, repository: MemoryRepository, user_id: int, chat_id: int,
                 message_key: str, sent: list[int]):
        super().__init__()
        self._telegram, self._repository = telegram, repository
        self._user_id, self._chat_id, self._message_key = user_id, chat_id, message_key
        self._ids = list(sent)

    async def _put(self, index: int, text: str) -> bool:
        try:
            if index < len(self._ids):
                return await self._telegram.edit(self._chat_id, self._ids[index], text, formatted=False)
            # Sent and recorded together, even when the step is cancelled meanwhile.
            await asyncio.shield(self._send(text))
        except CompanionError as exc:
            _log.info("telegram.preview_failed", chat_id=self._chat_id, error=exc.message)
            return False
        return True

    async def _send(self, text: str) -> None:
        self._ids.append(await self._telegram.send(self._chat_id, text, formatted=False))
        await self._repository.update_message_meta(self._user_id, self._message_key,
                                                   {PREVIEW_MESSAGES: self._ids})


class TerminalPreview(Preview):
    """The preview in a terminal chat (`companion chat`, `companion dev`): the new text, as PostgreSQL notifications
    on the user's channel (schemas.turn.reply_preview_channel), which the chat prints as they come. Nobody
    listening: they are dropped."""

    every_s = TERMINAL_EVERY_S

    def __init__(self, repository: MemoryRepository, telegram_id: int, reply_key: str):
        super().__init__()
        self._repository, self._reply_key = repository, reply_key
        self._channel = reply_preview_channel(telegram_id)
        self._sent = ""

    def _parts(self, text: str) -> list[str]:
        return [text.strip()]  # a terminal takes any length

    async def _put(self, index: int, text: str) -> bool:
        at = len(self._sent) if text.startswith(self._sent) else 0
        try:
            for start in range(at, len(text), NOTIFY_CHARS):
                chunk = ReplyPreviewChunk(reply_key=self._reply_key, at=start, text=text[start:start + NOTIFY_CHARS])
                await self._repository.notify(self._channel, chunk.model_dump_json())
        except CompanionError as exc:
            _log.info("terminal.preview_failed", reply_key=self._reply_key, error=exc.message)
            return False
        self._sent = text
        return True


def _group_prompt(data: GenerateReplyInput, context: UserContextSchema, budget: PromptBudget) -> TurnContext:
    """The prompt of a turn in a group chat: the user's name and the group's own recent messages, and nothing of
    their private conversation (no facts, events, diary, nudges, summary, recalled memories or private messages)."""
    prefix = f"tg:{data.chat_id}:"  # the keys of the group's messages and of the replies to them
    # A persona is a private choice: the group gets the companion's own.
    group = UserContextSchema(user=context.user.model_copy(update={"preferences": {}}), has_memories=False,
                              recent_messages=[m for m in context.recent_messages if m.message_key.startswith(prefix)])
    return build_prompt(group, data.message_key, f"{GROUP_NOTE}\n\n{data.note}" if data.note else GROUP_NOTE, budget)


@asynccontextmanager
async def _heartbeating() -> AsyncIterator[None]:
    """Heartbeat every HEARTBEAT_EVERY_S while the block runs (the worker is alive and the step in hand).

    The first beat comes after HEARTBEAT_EVERY_S, not at once: the heartbeat timeout counts from the start anyway,
    and a reply that comes quickly then costs the server no heartbeat at all.
    """

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_EVERY_S)
            activity.heartbeat()

    async with alongside(beat()):
        yield
