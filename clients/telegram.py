"""Telegram as a channel: splitting long replies, formatting them for Telegram, sending, and the typing indicator.

python-telegram-bot's errors become ours here, once: flood control (429) is retryable after the time Telegram asks
for; a blocked bot (403) is final and tells the workflow the user is out of reach.
"""

from __future__ import annotations

import asyncio
import re
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from html import escape

from telegram import Bot
from telegram.constants import ChatAction, ParseMode
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, RetryAfter, TelegramError
from telegram.warnings import PTBDeprecationWarning

from clients.http import AiohttpRequest
from core.concurrency import alongside
from core.errors import CompanionError, TelegramBlockedError, TelegramServiceError
from core.logging import get_logger
from core.settings import Settings

# Telegram's limit on one message's text, counted in UTF-16 code units after entity parsing.
MESSAGE_LIMIT = 4096
# Bots download the files users send of up to 20 MB (the Bot API's getFile limit).
DOWNLOAD_LIMIT = 20 * 1024 * 1024
# "typing…" shows only when the reply takes a noticeable time, as the Bot API asks of sendChatAction. A quicker reply
# goes out with no indicator: none can land after it and show "typing…" under it, and none is cut off mid-request
# by it (a cancelled request costs its connection: the next one opens a new one, TLS handshake and all).
TYPING_AFTER_S = 0.5
# Telegram shows "typing…" for 5 s after each chat action; renew it a little sooner.
TYPING_EVERY_S = 4.0
# A part shorter than this share of the limit is not worth a nicer cut: cut at a word instead.
_MIN_SHARE = 0.3

_log = get_logger(__name__)
# PTB warns on every RetryAfter that retry_after will become a timedelta; telegram_errors takes either.
warnings.filterwarnings("ignore", message=r".*`retry_after` will be of type", category=PTBDeprecationWarning)


# --- text --------------------------------------------------------------------------------------------------------


def utf16_len(text: str) -> int:
    """The length Telegram counts: UTF-16 code units (an emoji outside the BMP counts two)."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Cut a text into parts Telegram accepts, at a paragraph, line, sentence or word boundary when there is one."""
    parts: list[str] = []
    rest = text.strip()
    while utf16_len(rest) > limit:
        cut = _cut_point(rest, limit)
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _cut_point(text: str, limit: int) -> int:
    fits = _longest_prefix(text, limit)
    head = text[:fits]
    floor = int(fits * _MIN_SHARE)
    for boundary in (r"\n\s*\n", r"\n", r"[.!?…][\"')\]»]*\s", r"\s"):
        ends = [match.end() for match in re.finditer(boundary, head)]
        if ends and ends[-1] > floor:
            return ends[-1]
    return fits


def _longest_prefix(text: str, limit: int) -> int:
    units = 0
    for index, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


_CODE_BLOCK = re.compile(r"```(?:[\w+-]*\n)?(.*?)```", re.DOTALL)
_INLINE_CODE = re.compile(r"`([^`\n]+)`")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__", re.DOTALL)
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?![\w*])|(?<![\w_])_(?=\S)([^_\n]+?)(?<=\S)_(?![\w_])")
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")


def to_html(text: str) -> str:
    """The Markdown a model writes (bold, italic, code, links) as Telegram HTML, everything else escaped."""
    code: list[str] = []

    def keep(html: str) -> str:
        code.append(html)
        return f"\x00{len(code) - 1}\x00"

    text = _CODE_BLOCK.sub(lambda m: keep(f"<pre>{escape(m.group(1).strip(chr(10)), quote=False)}</pre>"), text)
    text = _INLINE_CODE.sub(lambda m: keep(f"<code>{escape(m.group(1), quote=False)}</code>"), text)
    text = escape(text, quote=False)
    text = _LINK.sub(lambda m: f'<a href="{escape(m.group(2))}">{m.group(1)}</a>', text)
    text = _BOLD.sub(lambda m: f"<b>{m.group(1) or m.group(2)}</b>", text)
    text = _ITALIC.sub(lambda m: f"<i>{m.group(1) or m.group(2)}</i>", text)
    return re.sub(r"\x00(\d+)\x00", lambda m: code[int(m.group(1))], _nested(text))


_STYLE_TAG = re.compile(r"<(/?)([bi])>")


def _nested(html: str) -> str:
    """Bold and italic made to nest, as Telegram requires: spans the substitutions above left crossing (``**a _b**
    c_``, ``***both***``) are closed and opened again around the tag that crossed them."""
    parts: list[str] = []
    open_tags: list[str] = []
    done = 0
    for tag in _STYLE_TAG.finditer(html):
        parts.append(html[done:tag.start()])
        done = tag.end()
        closing, name = tag.groups()
        if not closing:
            open_tags.append(name)
            parts.append(tag.group())
            continue
        inner = []
        while open_tags[-1] != name:  # every closing tag here closes one the substitutions opened
            inner.append(open_tags.pop())
            parts.append(f"</{inner[-1]}>")
        open_tags.pop()
        parts.append(tag.group())
        for again in reversed(inner):
            open_tags.append(again)
            parts.append(f"<{again}>")
    parts.append(html[done:])
    return re.sub(r"<([bi])></\1>", "", "".join(parts))


# --- sending -----------------------------------------------------------------------------------------------------


class TelegramChannel:
    """Sends to Telegram chats through one python-telegram-bot Bot, raising our errors."""

    def __init__(self, bot: Bot):
        self._bot = bot
        self._lock = asyncio.Lock()
        self._ready = False
        # Until when (time.monotonic()) Telegram's flood control holds each chat: a message sent sooner would be
        # refused again (and prolong the wait), so it is refused here, with the time left, without calling Telegram.
        self._flooded_until: dict[int, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> TelegramChannel | None:
        """The channel for TELEGRAM_BOT_TOKEN (at TELEGRAM_API_BASE_URL), or None when no token is set."""
        if settings.telegram_bot_token is None:
            return None
        base_url = settings.telegram_api_base_url
        return cls(Bot(settings.telegram_bot_token.get_secret_value(), base_url=base_url,
                       base_file_url=file_base_url(base_url), request=AiohttpRequest()))

    async def send(self, chat_id: int, text: str, *, formatted: bool = True) -> int:
        """Send one part (≤ MESSAGE_LIMIT) formatted as HTML, or as plain text when Telegram can't parse it (or
        when not ``formatted``: a preview); returns the message's id."""
        bot = await self._started()
        with self._waiting_out_flood(chat_id):
            if not formatted:
                return (await bot.send_message(chat_id, text)).message_id
            try:
                message = await bot.send_message(chat_id, to_html(text), parse_mode=ParseMode.HTML)
            except BadRequest as exc:
                if "can't parse entities" not in exc.message.lower():
                    raise
                _log.warning("telegram.formatting_refused", chat_id=chat_id, error=exc.message)
                message = await bot.send_message(chat_id, text)
        return message.message_id

    async def edit(self, chat_id: int, message_id: int, text: str, *, formatted: bool = True) -> bool:
        """Make a message the bot sent read ``text`` (formatted as ``send`` formats it); a message that already
        reads so counts as edited. False when the message can't be edited any more (deleted, or too old)."""
        bot = await self._started()
        with self._waiting_out_flood(chat_id):
            try:
                if formatted:
                    try:
                        await bot.edit_message_text(to_html(text), chat_id=chat_id, message_id=message_id,
                                                    parse_mode=ParseMode.HTML)
                        return True
                    except BadRequest as exc:
                        if "can't parse entities" not in exc.message.lower():
                            raise
                        _log.warning("telegram.formatting_refused", chat_id=chat_id, error=exc.message)
                await bot.edit_message_text(text, chat_id=chat_id, message_id=message_id)
            except BadRequest as exc:
                refusal = exc.message.lower()
                if "message is not modified" in refusal:
                    return True
                if "message to edit not found" in refusal or "message can't be edited" in refusal:
                    return False
                raise
        return True

    async def send_document(self, chat_id: int, filename: str, content: bytes, caption: str) -> int:
        """Send a file (at most 50 MB) with a plain caption (at most 1,024 characters); returns the message's id."""
        bot = await self._started()
        with self._waiting_out_flood(chat_id):
            return (await bot.send_document(chat_id, content, filename=filename, caption=caption)).message_id

    async def delete(self, chat_id: int, message_id: int) -> None:
        """Delete a message the bot sent; one already gone (or too old to delete) is left as it is."""
        bot = await self._started()
        with self._waiting_out_flood(chat_id):
            try:
                await bot.delete_message(chat_id, message_id)
            except BadRequest as exc:
                refusal = exc.message.lower()
                if "message to delete not found" not in refusal and "message can't be deleted" not in refusal:
                    raise

    async def draft(self, chat_id: int, draft_id: int, text: str) -> bool:
        """Show ``text``, plain, as draft ``draft_id`` of a private chat: the ephemeral, animated preview of a message
        being written (Bot API sendMessageDraft; the message itself is sent as usual once written). False when
        Telegram refuses or can't be reached: a preview is a courtesy, and the reply goes on without it."""
        try:
            bot = await self._started()
            with telegram_errors(chat_id):
                return await bot.send_message_draft(chat_id, draft_id, text)
        except CompanionError as exc:
            _log.info("telegram.draft_failed", chat_id=chat_id, error=exc.message)
            return False

    async def download(self, file_id: str) -> bytes:
        """A file a user sent, by its file id (getFile, then the file itself). Bots may download files of up to
        DOWNLOAD_LIMIT bytes: a larger one is refused, not retried."""
        bot = await self._started()
        with telegram_errors(None):
            file = await bot.get_file(file_id)
            if file.file_size is not None and file.file_size > DOWNLOAD_LIMIT:
                raise BadRequest("file is too big")
            return bytes(await file.download_as_bytearray())

    @asynccontextmanager
    async def typing(self, chat_id: int) -> AsyncIterator[None]:
        """Show "typing…" in the chat while the block runs, from TYPING_AFTER_S on; a failing indicator never fails
        the block."""
        async with alongside(self._keep_typing(chat_id)):
            yield

    async def _keep_typing(self, chat_id: int) -> None:
        await asyncio.sleep(TYPING_AFTER_S)
        while True:
            try:
                bot = await self._started()
                with telegram_errors(chat_id):
                    await bot.send_chat_action(chat_id, ChatAction.TYPING)
            except Exception as exc:
                _log.info("telegram.typing_failed", chat_id=chat_id, error=str(exc))
                return
            await asyncio.sleep(TYPING_EVERY_S)

    @contextmanager
    def _waiting_out_flood(self, chat_id: int) -> Iterator[None]:
        """``telegram_errors`` for a call to a chat, which flood control holds, when it does, until it lifts."""
        left = self._flooded_until.get(chat_id, 0.0) - time.monotonic()
        if left > 0:
            raise TelegramServiceError(f"Telegram flood control: retry in {left:.1f} s",
                                       context={"chat_id": chat_id, "retry_after_s": left})
        try:
            with telegram_errors(chat_id):
                yield
        except TelegramServiceError as exc:
            if (wait := exc.context.get("retry_after_s")) is not None:
                now = time.monotonic()
                self._flooded_until = {chat: until for chat, until in self._flooded_until.items() if until > now}
                self._flooded_until[chat_id] = now + float(wait)
            raise

    async def _started(self) -> Bot:
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    with telegram_errors(None):
                        await self._bot.initialize()
                    self._ready = True
        return self._bot

    async def close(self) -> None:
        """Close the bot's HTTP connections, also those a start that failed (Telegram unreachable) left open."""
        await self._bot.shutdown()  # a no-op for a bot that never started
        self._ready = False


def file_base_url(base_url: str) -> str:
    """Where the files of the Bot API at ``base_url`` (`https://api.telegram.org/bot`) are downloaded from
    (`https://api.telegram.org/file/bot`)."""
    root, bot = base_url.rstrip("/").rsplit("/", 1)
    return f"{root}/file/{bot}"


@contextmanager
def telegram_errors(chat_id: int | None = None) -> Iterator[None]:
    """python-telegram-bot's errors raised inside the block, as ours (never quoting the bot token)."""
    context = {"chat_id": chat_id}
    try:
        yield
    except RetryAfter as exc:
        wait = exc.retry_after
        seconds = wait.total_seconds() if isinstance(wait, timedelta) else float(wait)
        raise TelegramServiceError(f"Telegram flood control: retry in {seconds:g} s",
                                   context={**context, "retry_after_s": seconds}) from exc
    except Forbidden as exc:
        raise TelegramBlockedError(f"Telegram refused: {exc.message}", context=context) from exc
    except InvalidToken:
        # PTB's message quotes the token itself: never pass it on.
        raise TelegramServiceError("Telegram rejected TELEGRAM_BOT_TOKEN", context=context,
                                   retryable=False) from None
    except ChatMigrated as exc:
        raise TelegramServiceError("the group became a supergroup", retryable=False,
                                   context={**context, "new_chat_id": exc.new_chat_id}) from exc
    except BadRequest as exc:
        raise TelegramServiceError(f"Telegram refused the request: {exc.message}", context=context,
                                   retryable=False) from exc
    except TelegramError as exc:  # timeouts and network errors: worth another try
        raise TelegramServiceError(f"Telegram unreachable: {exc.message}", context=context) from exc
