"""Talking to the companion from a terminal: `say`, `chat`, and reading a transcript with `history`."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from temporalio.client import Client, WorkflowUpdateRPCTimeoutOrCancelledError

from core.errors import (
    CompanionError,
    ExternalServiceError,
    InvalidArgumentError,
    InvalidInputError,
    UserNotFoundError,
)
from core.settings import Settings
from schemas.memory import Channel, MessageRead, Role
from schemas.turn import (
    ATTACHMENT,
    MAX_MESSAGE_CHARS,
    ChatUser,
    IncomingMessage,
    ReplyPreviewChunk,
    TurnReply,
    clean_text,
    minutes,
    nudge_message_key,
    reply_preview_channel,
)
from workflows.client import connect, send_message

if TYPE_CHECKING:
    from storage.repository import MemoryRepository

REPLY_TIMEOUT_S = 300.0
# Settings only the worker reads: a client command given them still gets replies from the running worker's LLM.
WORKER_ONLY = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_CHAT_MODEL")
NUDGE_POLL_S = 1.0
NUDGE_LOOKBACK = 10  # the newest messages looked through for nudges
NUDGE_KEY_PREFIX = nudge_message_key("")


def console_message(telegram_id: int, text: str) -> IncomingMessage:
    """A terminal message from a user, keyed uniquely; an empty or overlong one is refused with a clear error."""
    cleaned = str(clean_text(text))
    if not cleaned:
        raise InvalidArgumentError("the message is empty: give some text to send")
    if len(cleaned) > MAX_MESSAGE_CHARS:
        raise InvalidArgumentError(f"the message is {len(cleaned):,} characters long; at most {MAX_MESSAGE_CHARS:,} "
                                "go in one message")
    return IncomingMessage(message_key=f"console:{telegram_id}:{uuid.uuid4().hex}",
                           user=ChatUser(telegram_id=telegram_id), chat_id=telegram_id, channel=Channel.CONSOLE,
                           text=cleaned, sent_at=datetime.now(UTC))


async def connect_or_explain(settings: Settings) -> Client:
    """A client of the configured Temporal server, or an error saying how to start one."""
    try:
        return await connect(settings)
    except RuntimeError as exc:
        raise ExternalServiceError(f"nothing is running at {settings.temporal_address}: start the companion with "
                                   "`uv run companion dev`", context={"address": settings.temporal_address},
                                   cause=exc) from None


async def ask(client: Client, settings: Settings, message: IncomingMessage,
              timeout_s: float = REPLY_TIMEOUT_S) -> TurnReply:
    """Send one message and wait for the companion's reply."""
    try:
        return await asyncio.wait_for(send_message(client, settings, message), timeout_s)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        raise ExternalServiceError(f"no reply within {timeout_s:g} s: is a worker running on task queue "
                                   f"{settings.temporal_task_queue}, and is its LLM answering?",
                                   context={"user": message.user.telegram_id}) from None


def worker_llm_note(settings: Settings, command: str, reply: TurnReply) -> str | None:
    """A note for a command given LLM settings (OPENAI_BASE_URL=... companion say) whose reply another model wrote:
    those settings are the worker's, not the command's."""
    given = [name for name in WORKER_ONLY if os.environ.get(name)]
    if not given or reply.model is None or reply.model.startswith(settings.chat_model_name):
        return None
    return (f"companion: note: {reply.model}, the running worker's LLM, wrote this reply: {', '.join(given)} given "
            f"to `companion {command}` {'is' if len(given) == 1 else 'are'} read by the worker only")


async def say(settings: Settings, telegram_id: int, text: str, timeout_s: float) -> int:
    """`companion say`: print the reply to one message."""
    message = console_message(telegram_id, text)  # refused before anything is contacted
    reply = await ask(await connect_or_explain(settings), settings, message, timeout_s)
    print(reply.text)
    if (note := worker_llm_note(settings, "say", reply)) is not None:
        print(note, file=sys.stderr)
    return 0


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    # A daemon thread reads stdin, so a blocked read never keeps the process alive at exit.
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read, daemon=True, name="stdin").start()
    return lines


class _Screen:
    """The chat on the terminal: the prompt, a "thinking…" line while a reply is awaited (on a terminal only), the
    reply as it is written, and messages the companion starts (nudges) shown as they come, above the prompt."""

    THINKING = "companion is thinking…"

    def __init__(self) -> None:
        self._live = sys.stdout.isatty()
        self._prompting = self._thinking = False
        self._expected: str | None = None  # the reply awaited
        self._grown: str | None = None  # what was printed of it as it was written

    def prompt(self) -> None:
        print("you> ", end="", flush=True)
        self._prompting = True

    def thinking(self) -> None:
        self._prompting = False
        if self._live:
            print(self.THINKING, end="", flush=True)
            self._thinking = True

    def _clear(self) -> None:
        if self._live and (self._thinking or self._prompting):
            print("\r\033[K", end="")  # back to the start of the line, and erase it
        elif self._prompting:
            print()
        self._thinking = False

    def expect(self, reply_key: str) -> None:
        """The reply to the message just sent is the one to show as it grows."""
        self._expected, self._grown = reply_key, None

    def grow(self, chunk: ReplyPreviewChunk) -> None:
        """More of the reply being written, printed as it comes. A retried attempt starts again on a new line; after
        a piece missed, the rest comes with the reply."""
        if chunk.reply_key != self._expected:
            return
        if chunk.at == 0:
            if self._grown:
                print()
            self._clear()
            print("companion> ", end="")
            self._grown = ""
        elif self._grown is None or chunk.at != len(self._grown):
            return
        print(chunk.text, end="", flush=True)
        self._grown += chunk.text

    def reply(self, text: str) -> None:
        """The reply, written: the rest of it after what was printed as it grew, or all of it."""
        grown, self._expected, self._grown = self._grown, None, None
        if grown is not None and text.startswith(grown):
            print(text[len(grown):], flush=True)
            return
        if grown is not None:
            print()
        self._clear()
        print(f"companion> {text}", flush=True)

    def note(self, text: str) -> None:
        self._clear()
        print(text, flush=True)

    def nudge(self, text: str) -> None:
        """A message the companion started, shown where the chat is, and the prompt or indicator again."""
        prompting, thinking = self._prompting, self._thinking
        if self._grown is not None:
            print()
        self._clear()
        print(f"companion> {text}", flush=True)
        if prompting:
            self.prompt()
        elif thinking:
            self.thinking()
        elif self._grown is not None:
            print(f"companion> {self._grown}", end="", flush=True)


async def _show_nudges(repository: MemoryRepository, telegram_id: int, since: datetime, screen: _Screen) -> None:
    """Show the nudges sent to the user from ``since`` on as they are sent (the chat polls PostgreSQL for them)."""
    shown: set[str] = set()
    while True:
        await asyncio.sleep(NUDGE_POLL_S)
        try:
            user = await repository.get_user_by_telegram_id(telegram_id)
            messages = await repository.recent_messages(user.id, limit=NUDGE_LOOKBACK)
        except CompanionError:  # no user yet, or the database is away for a moment: look again later
            continue
        for message in messages:
            if (message.message_key.startswith(NUDGE_KEY_PREFIX) and message.sent_at >= since
                    and message.message_key not in shown):
                shown.add(message.message_key)
                screen.nudge(message.content)


async def _show_growing(repository: MemoryRepository, telegram_id: int, screen: _Screen) -> None:
    """Show replies as they are written: the worker sends the new text as PostgreSQL notifications. Without them
    (the database away for a moment) a reply shows once written."""
    try:
        async with repository.listening(reply_preview_channel(telegram_id)) as heard:
            while True:
                screen.grow(ReplyPreviewChunk.model_validate_json(await heard.get()))
    except CompanionError:
        return


async def chat_loop(client: Client, settings: Settings, telegram_id: int,
                    repository: MemoryRepository | None = None) -> None:
    """An interactive chat as one user, until end of input or /quit. With the repository, replies show as they are
    written, and nudges the companion sends meanwhile appear in the chat."""
    print(f"Chatting as user {telegram_id}. Type a message; /quit or Ctrl-D to leave.")
    screen = _Screen()
    lines = _stdin_lines(asyncio.get_running_loop())
    noted = False  # the note on LLM settings given to the chat, said once
    watching = [asyncio.create_task(_show_nudges(repository, telegram_id, datetime.now(UTC), screen)),
                asyncio.create_task(_show_growing(repository, telegram_id, screen))] if repository is not None else []
    try:
        while True:
            screen.prompt()
            line = await lines.get()
            if line is None or line.strip() in ("/quit", "/exit"):
                print()
                return
            if line.strip():
                screen.thinking()
                try:
                    message = console_message(telegram_id, line)
                    screen.expect(message.reply_key)
                    reply = await ask(client, settings, message)
                except InvalidInputError as exc:  # e.g. too long: say so, and the chat goes on
                    screen.note(f"companion: {exc}")
                    continue
                screen.reply(reply.text)
                if not noted and (note := worker_llm_note(settings, "chat", reply)) is not None:
                    screen.note(note)
                    noted = True
    finally:
        for task in watching:
            task.cancel()


async def chat(settings: Settings, telegram_id: int) -> int:
    """`companion chat`: an interactive chat against a running companion."""
    client = await connect_or_explain(settings)
    async with open_repository(settings) as repository:
        await chat_loop(client, settings, telegram_id, repository)
    return 0


@asynccontextmanager
async def open_repository(settings: Settings) -> AsyncIterator[MemoryRepository]:
    """The memory repository on the configured (or embedded) PostgreSQL, for a short command."""
    # Imported here: `say` and `chat` start without SQLAlchemy.
    from storage.database import create_engine, create_session_factory
    from storage.embedded import postgres_url
    from storage.repository import MemoryRepository

    with postgres_url(settings) as url:
        engine = create_engine(url, pool_size=2, max_overflow=0)
        try:
            yield MemoryRepository(create_session_factory(engine))
        finally:
            await engine.dispose()


def _sent_as(message: MessageRead) -> str:
    """How a message was sent, when not as text: "(voice message, 0:12) " before its transcript."""
    attachment = message.meta.get(ATTACHMENT)
    if not attachment:
        return ""
    seconds = attachment.get("duration_s")
    length = f", {minutes(seconds)}" if seconds is not None else ""
    return f"({attachment['kind'].replace('_', ' ')}{length}) "


async def history(settings: Settings, telegram_id: int, limit: int) -> int:
    """`companion history`: a user's transcript from PostgreSQL, in their local time."""
    async with open_repository(settings) as repository:
        try:
            user = await repository.get_user_by_telegram_id(telegram_id)
        except UserNotFoundError:
            print(f"no conversation with user {telegram_id} yet")
            return 1
        messages = await repository.recent_messages(user.id, limit=limit)
    zone = user.timezone_info
    width = max(len(user.display_name), len("companion"))
    for message in messages:
        who = user.display_name if message.role == Role.USER else "companion"
        print(f"{message.sent_at.astimezone(zone):%Y-%m-%d %H:%M}  {who:<{width}}  {_sent_as(message)}"
              f"{message.content}")
    return 0
