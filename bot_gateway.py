"""The Telegram gateway: turns updates into messages for users' workflows, and answers commands.

It is stateless and never writes to the database: a text message becomes an `IncomingMessage` keyed by
(chat id, message id) and is signalled to the user's workflow (signal-with-start), which replies through its
delivery activity. A redelivered update carries the same key, and the workflow ignores it. Commands that change
memory (/forget, /quiet) are workflow updates. Long polling by default; a webhook when TELEGRAM_WEBHOOK_URL is set.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import warnings
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from telegram import (
    Audio,
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    Update,
    User,
    VideoNote,
    Voice,
)
from telegram.constants import ChatType, MessageEntityType
from telegram.error import TelegramError
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BaseUpdateProcessor,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBDeprecationWarning
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from clients.media import IMAGE_TYPES, audio_filename
from clients.telegram import DOWNLOAD_LIMIT, split_message, telegram_errors
from core.errors import ConfigurationError, UnknownTimezoneError
from core.logging import get_logger
from core.settings import Settings
from core.zones import zone_at, zone_named
from schemas.memory import PERSONA_MAX_CHARS, Channel, MemoryItem, describe_memory
from schemas.turn import (
    Attachment,
    ChatUser,
    CompanionState,
    IncomingMessage,
    MediaKind,
    Nudge,
    PersonaChange,
    TimezoneChange,
    TimezoneSource,
    clean_text,
    minutes,
)
from schemas.usage import describe_usage
from workflows.client import (
    connect,
    export,
    forget,
    forget_item,
    memory,
    persona,
    set_checkins,
    set_timezone,
    signal_message,
    usage,
)
from workflows.companion import CompanionWorkflow
from workflows.contract import workflow_id

GREETING = (
    "Hi {name}! I'm your companion. Talk to me about anything: your day, your plans, what's on your mind. "
    "I remember what you tell me, so you never have to start from zero, and I may check in on you now and then.\n\n"
    "Ask me to remind you of things (\"remind me tomorrow at 9 to call mom\"). /help lists what else I can do."
)
HELP = (
    "Just write to me. I can also:\n"
    "/memory: what I remember of you, and a button to forget any of it (/memory forget 3)\n"
    "/nudges: the messages I plan to send you\n"
    "/quiet: no more check-ins from me (/quiet off brings them back; reminders you ask for still come)\n"
    "/timezone: where you are, so reminders come at your time (/timezone Paris; or share a location)\n"
    "/persona: my name and how I talk with you (/persona You are Max, dry and funny; /persona reset)\n"
    "/export: everything I keep about you, as files to take with you\n"
    "/usage: what our conversation used and cost today and this month\n"
    "/forget: erase everything I remember about you\n"
    "/help: this list"
)
UNSUPPORTED = ("I can read text, listen to voice notes and look at photos; stickers, videos and other files pass "
               "me by. Could you tell me in words?")
MEDIA_NEEDS_MODEL = ("I can only read text here: listening to voice notes and looking at photos needs a model "
                     "this companion isn't set up with. Could you tell me in words?")
VOICE_TOO_LONG = ("That recording is {length} long, and I listen to up to {limit}. Could you send a shorter one, or "
                  "tell me in words?")
FILE_TOO_BIG = ("That file is {size:.0f} MB, and Telegram lets me fetch files of up to 20 MB. Could you send a "
                "smaller one?")
AUDIO_FORMAT = ("I can't play that kind of audio ({mime}): voice notes, MP3, M4A, Ogg, WAV, FLAC and WebM work. "
                "Could you send it as a voice note?")
IMAGE_FORMAT = "I can't open that kind of image ({mime}): JPEG, PNG, WebP and GIF work."

EDITED = "I saw you edited a message. I keep what you first wrote; if something changed, just tell me again."
NOT_ALLOWED = "Sorry, this companion is private: it only talks with the people it was set up for."
TOO_LONG = ("That message is {length:,} characters long and I can take in {limit:,} at a time. "
            "Could you send it in parts?")
EMPTY = "That message had no text I could read."
BUSY = "I couldn't take that in just now. Please send it again in a moment."
FORGET_ASK = ("Do you want me to forget everything I know about you: our conversations, what you told me, "
              "your reminders? This can't be undone.")
FORGET_DONE = "Done. I've forgotten everything about you. If you write again, we start afresh."
FORGET_KEPT = "Alright, I'll keep remembering."
FORGET_NOT_YOURS = "Only the person who asked can answer this. Send /forget yourself to erase what I know of you."
QUIET_ON = "Okay, no more check-ins from me. Reminders you ask for still come. /quiet off brings check-ins back."
QUIET_OFF = "Check-ins are back on: I'll say hello now and then."
NO_NUDGES = "I have no messages planned for you right now."
TIMEZONE_NOW = ("Your time zone is {zone}: it's {time} there. To change it, send /timezone and your city "
                "(/timezone Paris), a zone (/timezone Europe/Paris) or an offset (/timezone +02:00), or share a "
                "location with me.")
TIMEZONE_SET = "Got it: your time zone is {zone}, where it's {time}."
TIMEZONE_MOVED = "I moved what I planned to your time:"
TIMEZONE_PRIVATE = "Tell me your time zone in our private chat: in a group, everyone would see it."
MEMORY_PRIVATE = "Ask me what I remember of you in our private chat: in a group, everyone would see it."
USAGE_PRIVATE = "Ask me about your usage in our private chat: in a group, everyone would see it."
EXPORT_PRIVATE = "Ask me for your data in our private chat: in a group, everyone would see it."
PERSONA_NONE = ("I'm being myself with you. To give me another name or way of talking, send /persona and describe it, "
                "e.g. /persona You are Max, a dry-witted friend who answers in French.")
PERSONA_NOW = "With you I am: {persona}\n\n/persona reset brings back my own way."
PERSONA_SET = "From now on, with you I am: {persona}"
PERSONA_RESET = "Back to my own way."
PERSONA_TOO_LONG = "That's {length:,} characters; a persona takes at most {limit:,}."
PERSONA_PRIVATE = "Tell me how to be with you in our private chat: here I'm the same for everyone."
MEMORY_BUTTONS = "Tap a number to make me forget it, or send /memory forget and its number."
MEMORY_WHICH = "Which one? Send /memory forget and a number from 1 to {count} (/memory lists them)."
MEMORY_FORGOTTEN = "Forgotten: {text}"
MEMORY_GONE = "That one is forgotten already."

COMMANDS = [BotCommand("help", "what I can do"), BotCommand("memory", "what I remember of you"),
            BotCommand("nudges", "messages I plan to send you"),
            BotCommand("timezone", "your time zone (/timezone Paris)"),
            BotCommand("quiet", "no check-ins (/quiet off to undo)"),
            BotCommand("persona", "my name and tone with you"), BotCommand("export", "everything I keep about you"),
            BotCommand("usage", "what our conversation cost"),
            BotCommand("forget", "erase my memory of you")]
ALLOWED_UPDATES = [Update.MESSAGE, Update.EDITED_MESSAGE, Update.CALLBACK_QUERY]
SIGNAL_ATTEMPTS = 4
MAX_CONCURRENT_UPDATES = 64
WEBHOOK_MAX_BODY = 1 << 20  # an update is a few KB; 1 MiB is far above any
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
# Inline keyboards: a button's callback data is at most 64 bytes; /memory's buttons, five a row, at most 100.
CALLBACK_BYTES = 64
BUTTONS_A_ROW = 5
MAX_BUTTONS = 100

_log = get_logger(__name__)


def message_key(message: Message) -> str:
    """The key of a Telegram message: unique per chat, the same on every redelivery."""
    return f"tg:{message.chat_id}:{message.message_id}"


def chat_user(user: User) -> ChatUser:
    """Who wrote, as the workflow knows them."""
    return ChatUser(telegram_id=user.id, username=user.username, first_name=user.first_name,
                    last_name=user.last_name, language_code=user.language_code)


class Gateway:
    """The handlers of the bot, over a Temporal client."""

    def __init__(self, settings: Settings, client: Client):
        self._settings = settings
        self._client = client

    def install(self, application: Application) -> Application:
        """Register every handler on the application; returns it."""
        application.add_handler(CommandHandler("start", self.start))
        application.add_handler(CommandHandler("help", self.help))
        application.add_handler(CommandHandler("forget", self.forget))
        application.add_handler(CommandHandler("nudges", self.nudges))
        application.add_handler(CommandHandler("quiet", self.quiet))
        application.add_handler(CommandHandler("timezone", self.timezone))
        application.add_handler(CommandHandler("memory", self.memory))
        application.add_handler(CommandHandler("export", self.export))
        application.add_handler(CommandHandler("usage", self.usage))
        application.add_handler(CommandHandler("persona", self.persona))
        application.add_handler(CallbackQueryHandler(self.memory_answer, pattern=r"^mem:"))
        application.add_handler(CallbackQueryHandler(self.forget_answer, pattern=r"^forget:(yes|no)(:\d+)?$"))
        application.add_handler(MessageHandler(filters.UpdateType.EDITED_MESSAGE, self.edited))
        application.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT & ~filters.COMMAND,
                                               self.text))
        application.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.LOCATION & filters.ChatType.PRIVATE,
                                               self.location))
        application.add_handler(MessageHandler(
            filters.UpdateType.MESSAGE & (filters.VOICE | filters.AUDIO | filters.VIDEO_NOTE | filters.PHOTO
                                          | filters.Document.IMAGE), self.media))
        application.add_handler(MessageHandler(filters.UpdateType.MESSAGE & ~filters.COMMAND, self.unsupported))
        application.add_error_handler(self.error)
        return application

    # --- messages -----------------------------------------------------------------------------------------------

    async def text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A text message: checked, cleaned and signalled to the user's workflow."""
        if (sender := await self._sender(update, lambda message: self._addressed(message, context))) is None:
            return
        message, user = sender
        text = clean_text(_without_mention(message.text or "", context.bot.username))
        if not text:
            await message.reply_text(EMPTY)
            return
        limit = self._settings.telegram_max_message_chars
        if len(text) > limit:
            await message.reply_text(TOO_LONG.format(length=len(text), limit=limit))
            return
        await self._accept(message, user, text)

    async def media(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A voice note, audio, round video or photo: checked against the limits here, from what Telegram says of
        it (nothing is downloaded, nothing stored, when it is declined), then signalled with its file id; the worker
        transcribes or describes it."""
        if (sender := await self._sender(update, lambda message: self._addressed(message, context))) is None:
            return
        message, user = sender
        attachment = attachment_of(message)
        if attachment is None:
            await message.reply_text(UNSUPPORTED)
            return
        if (refusal := self._media_refusal(attachment)) is not None:
            _log.info("gateway.media_declined", message_key=message_key(message), kind=attachment.kind.value,
                      reason=refusal)
            await message.reply_text(refusal)
            return
        if attachment.caption is not None:
            caption = clean_text(_without_mention(attachment.caption, context.bot.username))
            attachment = attachment.model_copy(update={"caption": caption or None})
        await self._accept(message, user, placeholder(attachment), attachment)

    def _media_refusal(self, attachment: Attachment) -> str | None:
        """Why an attachment is declined (the polite answer), or None."""
        heard = attachment.kind.heard
        if not (self._settings.hears_voice if heard else self._settings.sees_photos):
            return MEDIA_NEEDS_MODEL
        if attachment.size is not None and attachment.size > DOWNLOAD_LIMIT:
            return FILE_TOO_BIG.format(size=attachment.size / 1024 / 1024)
        limit = self._settings.max_voice_seconds
        if heard and attachment.duration_s is not None and attachment.duration_s > limit:
            return VOICE_TOO_LONG.format(length=minutes(attachment.duration_s), limit=minutes(limit))
        if heard and audio_filename(attachment.mime_type, attachment.kind.value) is None:
            return AUDIO_FORMAT.format(mime=attachment.mime_type)
        if not heard and attachment.mime_type is not None and attachment.mime_type not in IMAGE_TYPES:
            return IMAGE_FORMAT.format(mime=attachment.mime_type)
        return None

    async def _accept(self, message: Message, user: User, text: str, attachment: Attachment | None = None) -> None:
        """Signal the message to the user's workflow; the user is asked to resend when Temporal can't be reached."""
        incoming = IncomingMessage(message_key=message_key(message), user=chat_user(user), chat_id=message.chat_id,
                                   channel=Channel.TELEGRAM, text=text, sent_at=message.date, attachment=attachment)
        try:
            await self._signal(incoming)
        except RPCError as exc:
            _log.error("gateway.signal_failed", message_key=incoming.message_key, error=str(exc))
            await message.reply_text(BUSY)
            return
        _log.info("gateway.accepted", message_key=incoming.message_key, telegram_id=user.id,
                  attachment=attachment.kind.value if attachment else None)

    async def _signal(self, incoming: IncomingMessage) -> None:
        # Temporal may be restarting: a few quick tries before the user is asked to resend.
        async for attempt in AsyncRetrying(stop=stop_after_attempt(SIGNAL_ATTEMPTS), reraise=True,
                                           wait=wait_exponential(multiplier=0.25, max=2),
                                           retry=retry_if_exception_type(RPCError)):
            with attempt:
                await signal_message(self._client, self._settings, incoming)

    async def unsupported(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Photos, voice, stickers, documents…: say what the companion understands today."""
        if (sender := await self._sender(update, lambda message: self._addressed(message, context))) is not None:
            await sender[0].reply_text(UNSUPPORTED)

    async def edited(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """An edit: the original stays what the companion answered."""
        if (sender := await self._sender(update, lambda message: message.chat.type == ChatType.PRIVATE)) is not None:
            await sender[0].reply_text(EDITED)

    # --- commands -----------------------------------------------------------------------------------------------

    async def start(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/start: the greeting."""
        if (sender := await self._sender(update)) is not None:
            message, user = sender
            await message.reply_text(GREETING.format(name=user.first_name))

    async def help(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/help: what the companion can do."""
        if (sender := await self._sender(update)) is not None:
            await sender[0].reply_text(HELP)

    async def forget(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/forget: ask for confirmation first; the buttons answer in forget_answer."""
        if (sender := await self._sender(update)) is None:
            return
        message, user = sender
        # The buttons name who asked: in a group, anyone can press them, and only the asker's answer counts.
        buttons = InlineKeyboardMarkup([[
            InlineKeyboardButton("Yes, forget everything", callback_data=f"forget:yes:{user.id}"),
            InlineKeyboardButton("No, keep it", callback_data=f"forget:no:{user.id}")]])
        await message.reply_text(FORGET_ASK, reply_markup=buttons)

    async def forget_answer(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """The answer to /forget's question."""
        query, user = update.callback_query, update.effective_user
        if query is None or user is None:
            return
        if not self._is_allowed(user):
            await query.answer(NOT_ALLOWED)
            return
        answer, _, asker = (query.data or "").removeprefix("forget:").partition(":")
        if asker:
            mine = asker == str(user.id)
        else:  # buttons sent before they named the asker count only in the asker's own private chat
            mine = query.message is not None and query.message.chat.id == user.id
        if not mine:
            await query.answer(FORGET_NOT_YOURS, show_alert=True)
            _log.warning("gateway.forget_refused", telegram_id=user.id, asker=asker or None)
            return
        await query.answer()
        if answer != "yes":
            await query.edit_message_text(FORGET_KEPT)
            return
        forgotten = await forget(self._client, self._settings, chat_user(user))
        _log.info("gateway.forgotten", telegram_id=user.id, had_memories=forgotten.had_memories)
        await query.edit_message_text(FORGET_DONE)

    async def nudges(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/nudges: the pending nudges, in the user's time zone."""
        if (sender := await self._sender(update)) is None:
            return
        message, user = sender
        state = await self._state(user.id)
        await message.reply_text(describe_nudges(state) if state is not None and state.nudges else NO_NUDGES)

    async def quiet(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/quiet turns check-ins off; /quiet off turns them back on."""
        if (sender := await self._sender(update)) is None:
            return
        message, user = sender
        enable = [arg.lower() for arg in context.args or []] == ["off"]
        await set_checkins(self._client, self._settings, chat_user(user), enable)
        await message.reply_text(QUIET_OFF if enable else QUIET_ON)

    async def timezone(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/timezone CITY, ZONE or OFFSET sets the user's time zone; /timezone alone says which it is."""
        if (sender := await self._private_sender(update, TIMEZONE_PRIVATE)) is None:
            return
        message, user = sender
        typed = " ".join(context.args or [])
        if not typed:
            state = await self._state(user.id)
            zone = state.timezone if state is not None else "UTC"
            await message.reply_text(TIMEZONE_NOW.format(zone=zone, time=_local_time(zone)))
            return
        try:
            zone = await asyncio.to_thread(zone_named, typed)  # the first question loads the cities (a second)
        except UnknownTimezoneError as exc:
            await message.reply_text(f"{exc.message[0].upper()}{exc.message[1:]}.")
            return
        await self._set_timezone(message, user, TimezoneChange(zone=zone, source=TimezoneSource.COMMAND))

    async def memory(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/memory: what the companion remembers of the user, numbered, a button to forget each; /memory forget N
        forgets the Nth."""
        if (sender := await self._private_sender(update, MEMORY_PRIVATE)) is None:
            return
        message, user = sender
        listing = await memory(self._client, self._settings, chat_user(user))
        args = [arg.lower() for arg in context.args or []]
        if args[:1] == ["forget"]:
            number = int(args[1]) if len(args) == 2 and args[1].isdigit() else 0
            if not 1 <= number <= len(listing.items):
                await message.reply_text(MEMORY_WHICH.format(count=len(listing.items)))
                return
            await message.reply_text(await self._forget_item(user, listing.items[number - 1]))
            return
        parts = split_message(describe_memory(listing.items, ZoneInfo(listing.timezone)))
        for part in parts[:-1]:
            await message.reply_text(part)
        buttons = [InlineKeyboardButton(str(number), callback_data=f"mem:{item.ref}")
                   for number, item in enumerate(listing.items, start=1) if len(f"mem:{item.ref}") <= CALLBACK_BYTES]
        if not buttons:
            await message.reply_text(parts[-1])
            return
        rows = [buttons[start:start + BUTTONS_A_ROW] for start in range(0, min(len(buttons), MAX_BUTTONS),
                                                                         BUTTONS_A_ROW)]
        await message.reply_text(f"{parts[-1]}\n\n{MEMORY_BUTTONS}", reply_markup=InlineKeyboardMarkup(rows))

    async def usage(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/usage: what the user's conversation used and cost today and this month; an admin sees everyone's
        too."""
        if (sender := await self._private_sender(update, USAGE_PRIVATE)) is None:
            return
        message, user = sender
        text = describe_usage(await usage(self._client, self._settings, chat_user(user)))
        if user.id in self._settings.telegram_admin_user_ids:
            text += "\n\n" + describe_usage(await usage(self._client, self._settings, chat_user(user), everyone=True))
        await message.reply_text(text)

    async def export(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """/export: everything kept of the user, as two documents in their private chat (the worker sends them)."""
        if (sender := await self._private_sender(update, EXPORT_PRIVATE)) is None:
            return
        message, user = sender
        exported = await export(self._client, self._settings, chat_user(user))
        _log.info("gateway.exported", telegram_id=user.id, rows=exported.rows)

    async def persona(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """/persona TEXT: the companion's name and tone with this user; /persona reset; /persona alone says which."""
        if (sender := await self._private_sender(update, PERSONA_PRIVATE)) is None:
            return
        message, user = sender
        # The text as typed after the command (its line breaks kept), not re-joined from its words.
        text = clean_text(re.sub(r"^/\S+\s*", "", message.text or "")) if context.args else ""
        reset = text.lower() == "reset"
        if len(text) > PERSONA_MAX_CHARS:
            await message.reply_text(PERSONA_TOO_LONG.format(length=len(text), limit=PERSONA_MAX_CHARS))
            return
        change = PersonaChange(text=None if reset or not text else text, reset=reset)
        now = await persona(self._client, self._settings, chat_user(user), change)
        _log.info("gateway.persona", telegram_id=user.id, set=now is not None)
        if reset:
            await message.reply_text(PERSONA_RESET)
        elif now is None:
            await message.reply_text(PERSONA_NONE)
        else:
            await message.reply_text((PERSONA_SET if text else PERSONA_NOW).format(persona=now))

    async def memory_answer(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button under /memory's list: forget that item (only its owner can, in their private chat)."""
        query, user = update.callback_query, update.effective_user
        if query is None or user is None:
            return
        if query.message is None or query.message.chat.id != user.id:
            await query.answer()
            return
        if not self._is_allowed(user):
            await query.answer(NOT_ALLOWED)
            return
        ref = (query.data or "").removeprefix("mem:")
        listing = await memory(self._client, self._settings, chat_user(user))
        item = next((item for item in listing.items if item.ref == ref), None)
        answer = await self._forget_item(user, item) if item is not None else MEMORY_GONE
        await query.answer(answer[:200])
        await query.message.reply_text(answer)

    async def _forget_item(self, user: User, item: MemoryItem) -> str:
        forgotten = await forget_item(self._client, self._settings, chat_user(user), item.ref)
        _log.info("gateway.memory_item_forgotten", telegram_id=user.id, kind=item.kind.value, forgotten=forgotten)
        return MEMORY_FORGOTTEN.format(text=item.text) if forgotten else MEMORY_GONE

    async def location(self, update: Update, _context: ContextTypes.DEFAULT_TYPE) -> None:
        """A location shared in the private chat: its time zone becomes the user's (the place itself is not kept)."""
        if (sender := await self._sender(update)) is None or sender[0].location is None:
            return
        message, user = sender
        place = message.location
        zone = await asyncio.to_thread(zone_at, place.latitude, place.longitude)
        await self._set_timezone(message, user, TimezoneChange(zone=zone, source=TimezoneSource.LOCATION))

    async def _set_timezone(self, message: Message, user: User, change: TimezoneChange) -> None:
        changed = await set_timezone(self._client, self._settings, chat_user(user), change)
        _log.info("gateway.timezone_set", telegram_id=user.id, source=change.source.value,
                  nudges_moved=len(changed.moved))
        lines = [TIMEZONE_SET.format(zone=changed.zone, time=_local_time(changed.zone))]
        if changed.moved:
            zone = ZoneInfo(changed.zone)
            lines += ["", TIMEZONE_MOVED, *(_nudge_line(nudge, zone) for nudge in changed.moved)]
        await message.reply_text("\n".join(lines))

    async def _state(self, telegram_id: int) -> CompanionState | None:
        """The user's workflow state; None when they have none."""
        try:
            return await self._client.get_workflow_handle(workflow_id(telegram_id)).query(CompanionWorkflow.state)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            return None

    async def error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log a handler's failure; the gateway goes on with the next update."""
        update_id = update.update_id if isinstance(update, Update) else None
        _log.error("gateway.handler_failed", update_id=update_id, error_type=type(context.error).__name__,
                   error=str(context.error))

    # --- who may talk -------------------------------------------------------------------------------------------

    def _is_allowed(self, user: User) -> bool:
        allowed = self._settings.telegram_allowed_user_ids
        return not allowed or user.id in allowed

    async def _sender(self, update: Update,
                      concerns_us: Callable[[Message], bool] = lambda _message: True) -> tuple[Message, User] | None:
        """The message and its author when the companion should answer: it concerns us and the author is allowed.

        Someone not on the allow-list gets the polite refusal here.
        """
        message, user = update.effective_message, update.effective_user
        if message is None or user is None or not concerns_us(message):
            return None
        if self._is_allowed(user):
            return message, user
        _log.info("gateway.refused", telegram_id=user.id, reason="not on the allow-list")
        await message.reply_text(NOT_ALLOWED)
        return None

    async def _private_sender(self, update: Update, elsewhere: str) -> tuple[Message, User] | None:
        """As _sender, for a command about the user's own data: in any other chat than their private one it is
        answered with ``elsewhere`` (everyone there would read the answer) and not done."""
        if (sender := await self._sender(update)) is None:
            return None
        if sender[0].chat.type != ChatType.PRIVATE:
            await sender[0].reply_text(elsewhere)
            return None
        return sender

    @staticmethod
    def _addressed(message: Message, context: ContextTypes.DEFAULT_TYPE) -> bool:
        """In a private chat always; in a group only when the bot is mentioned or replied to."""
        if message.chat.type == ChatType.PRIVATE:
            return True
        bot = context.bot
        replied = message.reply_to_message
        if replied is not None and replied.from_user is not None and replied.from_user.id == bot.id:
            return True
        mentions = message.parse_entities([MessageEntityType.MENTION, MessageEntityType.TEXT_MENTION])
        mentions |= message.parse_caption_entities([MessageEntityType.MENTION, MessageEntityType.TEXT_MENTION])
        return any(text.lower() == f"@{bot.username}".lower() or (entity.user is not None and entity.user.id == bot.id)
                   for entity, text in mentions.items())


def attachment_of(message: Message) -> Attachment | None:
    """What a message carries to listen to or look at, as Telegram describes it; None for anything else."""
    caption = message.caption or None
    if message.voice is not None:
        voice = message.voice
        return Attachment(kind=MediaKind.VOICE, file_id=voice.file_id, file_unique_id=voice.file_unique_id,
                          duration_s=_seconds(voice), size=voice.file_size, mime_type=voice.mime_type,
                          caption=caption)
    if message.audio is not None:
        audio = message.audio
        return Attachment(kind=MediaKind.AUDIO, file_id=audio.file_id, file_unique_id=audio.file_unique_id,
                          duration_s=_seconds(audio), size=audio.file_size, mime_type=audio.mime_type,
                          caption=caption)
    if message.video_note is not None:
        note = message.video_note
        return Attachment(kind=MediaKind.VIDEO_NOTE, file_id=note.file_id, file_unique_id=note.file_unique_id,
                          duration_s=_seconds(note), size=note.file_size, mime_type="video/mp4")
    if message.photo:
        largest = message.photo[-1]  # Telegram lists a photo's sizes smallest first
        return Attachment(kind=MediaKind.PHOTO, file_id=largest.file_id, file_unique_id=largest.file_unique_id,
                          size=largest.file_size, mime_type="image/jpeg", caption=caption)
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return Attachment(kind=MediaKind.PHOTO, file_id=document.file_id, file_unique_id=document.file_unique_id,
                          size=document.file_size, mime_type=document.mime_type, caption=caption)
    return None


def placeholder(attachment: Attachment) -> str:
    """The message's text until the worker transcribes or describes its attachment (and if it can't)."""
    what = {MediaKind.VOICE: "voice message", MediaKind.AUDIO: "audio", MediaKind.VIDEO_NOTE: "video message",
            MediaKind.PHOTO: "photo"}[attachment.kind]
    length = f", {minutes(attachment.duration_s)}" if attachment.duration_s is not None else ""
    return f"[{what}{length}]" + (f"\n\n{attachment.caption}" if attachment.caption else "")


def _seconds(media: Voice | Audio | VideoNote) -> int:
    """A recording's length in seconds (python-telegram-bot warns that the attribute becomes a timedelta)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        duration = media.duration
    return int(duration.total_seconds()) if isinstance(duration, timedelta) else int(duration)


def _without_mention(text: str, username: str) -> str:
    return re.sub(rf"@{re.escape(username)}\b", "", text, flags=re.IGNORECASE)


def describe_nudges(state: CompanionState) -> str:
    """The pending nudges as the user reads them, in their own time zone."""
    try:
        zone = ZoneInfo(state.timezone)
    except ZoneInfoNotFoundError:
        zone = ZoneInfo("UTC")
    lines = ["Here's what I plan to send you:"]
    lines += [_nudge_line(nudge, zone) for nudge in state.nudges]
    return "\n".join(lines)


def _local_time(zone: str) -> str:
    """What the clocks say in ``zone`` now."""
    now = datetime.now(ZoneInfo(zone))
    return f"{now:%H:%M} on {now:%A}"


def _nudge_line(nudge: Nudge, zone: ZoneInfo) -> str:
    """A planned message as the user reads it: when, in their zone, and what."""
    local: datetime = nudge.at.astimezone(zone)
    return f"• {local:%a %d %b, %H:%M} ({local.tzname()}): {nudge.text or nudge.purpose}"


class PerChatOrder(BaseUpdateProcessor):
    """Updates of different chats are handled concurrently; one chat's updates in the order Telegram sent them.

    Two messages of one user signalled out of order would be answered out of order.
    """

    def __init__(self, max_concurrent_updates: int = MAX_CONCURRENT_UPDATES):
        super().__init__(max_concurrent_updates)
        self._chats: dict[int, tuple[asyncio.Lock, int]] = {}

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            await coroutine
            return
        lock, users = self._chats.get(chat.id, (asyncio.Lock(), 0))
        self._chats[chat.id] = (lock, users + 1)
        try:
            async with lock:  # FIFO: tasks are created, and reach the lock, in the order updates arrive
                await coroutine
        finally:
            lock, users = self._chats[chat.id]
            if users == 1:
                del self._chats[chat.id]
            else:
                self._chats[chat.id] = (lock, users - 1)

    async def initialize(self) -> None:
        """Nothing to set up."""

    async def shutdown(self) -> None:
        """Nothing to tear down."""


def build_application(settings: Settings, client: Client) -> Application:
    """The python-telegram-bot application of the gateway, pointed at TELEGRAM_API_BASE_URL."""
    if settings.telegram_bot_token is None:
        raise ValueError("the gateway needs TELEGRAM_BOT_TOKEN")
    builder = (ApplicationBuilder().token(settings.telegram_bot_token.get_secret_value())
               .base_url(settings.telegram_api_base_url).concurrent_updates(PerChatOrder()))
    if settings.telegram_webhook_url:
        builder = builder.updater(None)  # the webhook is WebhookReceiver's; the updater only polls
    application = builder.build()
    return Gateway(settings, client).install(application)


class WebhookReceiver:
    """Telegram's webhook: the secret token is checked before a byte of the body is read, a body over
    WEBHOOK_MAX_BODY is refused, and a body that is no update is a 400; each update goes to the application's queue.

    python-telegram-bot's own webhook server reads the whole body first (up to ~100 MB) and answers JSON it cannot
    decode with a 500; this is its documented custom-webhook path (updates put on ``application.update_queue``).
    """

    def __init__(self, application: Application, path: str, secret: str):
        self._application, self._secret = application, secret.encode()
        app = web.Application(client_max_size=WEBHOOK_MAX_BODY)
        app.router.add_post(path, self.receive)
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self, listen: str, port: int) -> None:
        """Listen on ``listen:port``."""
        await self._runner.setup()
        await web.TCPSite(self._runner, listen, port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def receive(self, request: web.Request) -> web.Response:
        """One POST from Telegram."""
        if not hmac.compare_digest(request.headers.get(SECRET_HEADER, "").encode(), self._secret):
            return _refusal(403, "wrong or missing secret token")
        if request.content_length is not None and request.content_length > WEBHOOK_MAX_BODY:
            return _refusal(413, "body too large")
        try:
            data = json.loads(await request.read())
            update = Update.de_json(data, self._application.bot) if isinstance(data, dict) else None
        except web.HTTPRequestEntityTooLarge:
            return _refusal(413, "body too large")
        except (ValueError, TypeError, KeyError, TelegramError):
            update = None
        if update is None:
            _log.warning("gateway.webhook_refused", reason="not an update", size=request.content_length)
            return web.Response(status=400, text="not an update")
        await self._application.update_queue.put(update)
        return web.Response(status=200)


def _refusal(status: int, reason: str) -> web.Response:
    """A refusal that closes the connection, so that the rest of the body is never read."""
    _log.warning("gateway.webhook_refused", status=status, reason=reason)
    response = web.Response(status=status, text=reason)
    response.force_close()
    return response


async def run_gateway(settings: Settings, stop: asyncio.Event, client: Client | None = None,
                      started: asyncio.Event | None = None) -> None:
    """Receive updates (long polling, or the webhook when TELEGRAM_WEBHOOK_URL is set) until ``stop`` is set.

    ``started`` is set once updates are being received.
    """
    client = client or await connect(settings)
    application = build_application(settings, client)
    try:
        with telegram_errors():  # a wrong token or an unreachable Bot API: one clear error
            await application.initialize()  # checks the token with getMe
            await application.bot.set_my_commands(COMMANDS)
        await application.start()
        webhook = None
        try:
            webhook = await _receive(settings, application)
            if started is not None:
                started.set()
            await stop.wait()
        finally:
            if webhook is not None:
                await webhook.stop()
            if application.updater is not None and application.updater.running:
                await application.updater.stop()
            await application.stop()
    finally:
        await application.shutdown()
    _log.info("gateway.stopped")


async def _receive(settings: Settings, application: Application) -> WebhookReceiver | None:
    """Start receiving updates: long polling, or the webhook (returned, to be stopped)."""
    if not settings.telegram_webhook_url:
        updater = application.updater
        assert updater is not None
        with telegram_errors():
            await updater.start_polling(allowed_updates=ALLOWED_UPDATES)
        _log.info("gateway.started", mode="polling")
        return None
    secret = settings.telegram_webhook_secret
    assert secret is not None  # the settings refuse a webhook without one
    webhook = WebhookReceiver(application, urlsplit(settings.telegram_webhook_url).path or "/",
                              secret.get_secret_value())
    try:
        await webhook.start(settings.telegram_webhook_listen, settings.telegram_webhook_port)
    except OSError as exc:
        raise ConfigurationError(f"the webhook cannot listen on {settings.telegram_webhook_listen}:"
                                 f"{settings.telegram_webhook_port}: {exc.strerror or exc}") from exc
    with telegram_errors():
        await application.bot.set_webhook(settings.telegram_webhook_url, secret_token=secret.get_secret_value(),
                                          allowed_updates=ALLOWED_UPDATES)
    _log.info("gateway.started", mode="webhook", port=settings.telegram_webhook_port)
    return webhook
