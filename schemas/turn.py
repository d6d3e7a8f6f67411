"""Contracts of the per-user workflow: its messages, its state, and the inputs and results of its activities."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from schemas.memory import (
    PERSONA_MAX_CHARS,
    Channel,
    MemoryItem,
    MessageKey,
    NudgeCreator,
    NudgeKind,
    NudgeStatus,
    Role,
    TelegramId,
    TimeZoneName,
    UserName,
    display_name,
)

# Bounds that keep the workflow state small whatever the length of the conversation.
SEEN_KEYS_KEPT = 200
REPLIES_KEPT = 20
TRANSCRIPT_LINES_KEPT = 8
TRANSCRIPT_LINE_CHARS = 200
DEFAULT_TURNS_PER_RUN = 200
MAX_MESSAGE_CHARS = 16_000
MAX_PENDING_NUDGES = 50
# The remember step waits for a pause in the conversation, but never for more than this many turns: their messages
# (10) stay within the prompt's recent conversation (12 messages) until they are indexed.
REMEMBER_BATCH_TURNS = 5
DEFAULT_REMEMBER_AFTER_QUIET_S = 60
DEFAULT_REPLY_DEADLINE_S = 45
DEFAULT_MESSAGES_PER_MINUTE = 20

# Keep newlines and tabs; every other control character is noise at best and a prompt trick at worst (and PostgreSQL
# refuses a NUL in text).
_CONTROL_TABLE = dict.fromkeys(code for code in [*range(0x20), *range(0x7F, 0xA0)] if code not in (0x09, 0x0A))


def clean_text(text: object) -> object:
    """The text without control characters (newlines and tabs stay), line endings made plain, and lone surrogates
    (which no UTF-8 store takes) replaced; whatever is not a string is left to the type check."""
    if not isinstance(text, str):
        return text
    text = text.encode("utf-8", "replace").decode("utf-8") if not text.isascii() else text
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL_TABLE).strip()


# A user's message, cleaned wherever it comes from (Telegram, the terminal, a client of the workflow): what is left
# must be 1 to MAX_MESSAGE_CHARS characters.
MessageText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_MESSAGE_CHARS),
                        BeforeValidator(clean_text)]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatUser(_Contract):
    """Who sent a message, as the channel knows them."""

    telegram_id: TelegramId
    username: UserName = None
    first_name: UserName = None
    last_name: UserName = None
    language_code: str | None = None

    @property
    def display_name(self) -> str:
        """The name to show operators and to greet the user by."""
        return display_name(self.first_name, self.last_name, self.username, self.telegram_id)


_REPLY = ":reply"


def reply_key_of(message_key: str) -> str:
    """The message key of the companion's reply to the message with this key."""
    return f"{message_key}{_REPLY}"


def replied_key_of(message_key: str) -> str | None:
    """The key of the message that the message with this key replies to; None when it is no reply (a nudge)."""
    return message_key.removesuffix(_REPLY) if message_key.endswith(_REPLY) else None


def reply_preview_channel(telegram_id: int) -> str:
    """The PostgreSQL notification channel on which a terminal chat with the user hears replies as they are
    written."""
    return f"companion_reply_{telegram_id}"


class ReplyPreviewChunk(_Contract):
    """A piece of a reply being written, for a terminal chat: ``text`` goes at character ``at`` of the reply so far
    (0 again: a retried attempt starts it over)."""

    reply_key: str
    at: int
    text: str


def nudge_message_key(nudge_id: str) -> str:
    """The message key a fired nudge is stored under."""
    return f"nudge:{nudge_id}"


class MediaKind(StrEnum):
    """What a message carries besides text: something to listen to, or a picture."""

    VOICE = "voice"
    AUDIO = "audio"
    VIDEO_NOTE = "video_note"
    PHOTO = "photo"

    @property
    def heard(self) -> bool:
        """True for what is transcribed (voice, audio, a round video), False for a picture, which is described."""
        return self != MediaKind.PHOTO


def minutes(seconds: int) -> str:
    """A recording's length as people read it: 1:05."""
    return f"{seconds // 60}:{seconds % 60:02d}"


# The meta key of a stored message that came with an attachment: the Attachment, file id included (provenance).
ATTACHMENT = "attachment"


class Attachment(_Contract):
    """A voice note, audio file, round video or photo, as Telegram describes it: its file id (the worker downloads
    it), never its bytes, so the workflow's payloads stay small."""

    kind: MediaKind
    file_id: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    file_unique_id: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    duration_s: int | None = Field(default=None, ge=0)
    size: int | None = Field(default=None, ge=0)
    mime_type: str | None = Field(default=None, max_length=100)
    caption: Annotated[str, StringConstraints(strip_whitespace=True, max_length=MAX_MESSAGE_CHARS)] | None = None


class IncomingMessage(_Contract):
    """One message from a user, as the gateway or the terminal hands it to the user's workflow. A message with an
    attachment has a placeholder text ("[voice note, 0:12]") until the transcript or description replaces it."""

    message_key: MessageKey
    user: ChatUser
    chat_id: int
    channel: Channel
    text: MessageText
    sent_at: AwareDatetime
    attachment: Attachment | None = None

    @property
    def reply_key(self) -> str:
        """The message key of the companion's reply to this message."""
        return reply_key_of(self.message_key)


class UnderstandInput(_Contract):
    """Transcribe or describe a message's attachment."""

    message_key: str
    attachment: Attachment


class Understood(_Contract):
    """What an attachment said or showed, as the user's message: the transcript (and the caption), or the photo's
    description beside its caption."""

    text: MessageText
    model: str | None = None


class CheckLimitsInput(_Contract):
    """Where a user stands against their limits now (in their time zone)."""

    telegram_id: int
    zone: str
    now: AwareDatetime


class Standing(_Contract):
    """Whether an operator exempted the user from limits, and until when (their next midnight) their daily budget
    is spent; None: it is not."""

    unlimited: bool = False
    over_budget_until: AwareDatetime | None = None


class UsageInput(_Contract):
    """A user's usage today and this month (everyone's, for None), in ``zone``."""

    telegram_id: int | None
    zone: str
    now: AwareDatetime


class TurnReply(_Contract):
    """The companion's answer to one message."""

    message_key: str
    reply_key: str
    text: str
    fallback: bool = False
    limited: bool = False  # a limit answered instead of the model (the message is kept, not remembered)
    model: str | None = None  # the model that wrote it (None: a fallback, or an earlier attempt's stored reply)


class Nudge(_Contract):
    """A proactive message at a time: its text as given, or a purpose the companion writes it from."""

    nudge_id: MessageKey
    at: AwareDatetime
    text: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=4_000)] | None = None
    purpose: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1_000)] | None = None
    kind: NudgeKind = NudgeKind.CUSTOM
    created_by: NudgeCreator = NudgeCreator.OPERATOR
    # Due at a time of day where the user is ("tomorrow at 9"): when their time zone changes, 9:00 stays 9:00 there.
    # Not a nudge due after a while ("in 2 hours", a check-in after days of silence) or at a moment an operator chose.
    local_time: bool = False


class CompanionState(_Contract):
    """Everything a user's workflow carries, across continue-as-new too. Bounded: text lives in PostgreSQL."""

    telegram_id: TelegramId
    user_id: int | None = None
    display_name: str | None = None
    queue: list[IncomingMessage] = Field(default_factory=list)
    seen_keys: list[str] = Field(default_factory=list)
    replies: list[TurnReply] = Field(default_factory=list)
    transcript: list[str] = Field(default_factory=list)
    turns: int = 0
    turns_this_run: int = 0
    fallbacks: int = 0
    turns_per_run: int = Field(default=DEFAULT_TURNS_PER_RUN, ge=1)
    summary: str = ""
    last_turn_at: datetime | None = None
    nudges: list[Nudge] = Field(default_factory=list)
    done_nudges: list[str] = Field(default_factory=list)
    channel: Channel = Channel.CONSOLE
    chat_id: int | None = None
    timezone: str = "UTC"
    blocked: bool = False
    checkins: bool = True
    checkin_after_days: int = Field(default=3, ge=0)
    undelivered: int = 0
    # Seconds of silence after a turn before the remember step runs; 0 = after every turn.
    remember_after_quiet_s: int = Field(default=DEFAULT_REMEMBER_AFTER_QUIET_S, ge=0)
    # Seconds a message may wait for its reply, LLM retries included; then the user gets the fallback reply.
    reply_deadline_s: int = Field(default=DEFAULT_REPLY_DEADLINE_S, ge=1)
    # Messages a minute the model answers (0: no limit); when the recent ones arrived; those over it, to slow down.
    messages_per_minute: int = Field(default=DEFAULT_MESSAGES_PER_MINUTE, ge=0)
    recent_arrivals: list[AwareDatetime] = Field(default_factory=list)
    slowed: list[str] = Field(default_factory=list)
    # A daily budget is set (USER_DAILY_BUDGET_USD or USER_DAILY_TOKENS): each turn checks it first.
    budgeted: bool = False


# --- activity contracts -----------------------------------------------------------------------------------------


class EnsureUserInput(_Contract):
    """Find or create the stored user for a channel user."""

    user: ChatUser


class UserRef(_Contract):
    """The stored user a workflow speaks for."""

    user_id: int
    display_name: str
    timezone: str


class RecordMessageInput(_Contract):
    """Store one message of the conversation (idempotent by message key)."""

    user_id: int
    message_key: MessageKey
    role: Role
    text: str
    channel: Channel
    sent_at: AwareDatetime
    fallback: bool = False


class ChatTurn(_Contract):
    """One earlier message, as the LLM sees it."""

    role: Role
    content: str


class TurnContext(_Contract):
    """The prompt of a turn: the system prompt with the user's memory, the recent conversation, and what the model is
    told just before the message (the memories recalled for it, a note on the turn).

    What changes every turn comes last, so that a model server's prompt cache keeps the rest from turn to turn.
    """

    system_prompt: str
    history: list[ChatTurn]
    before_message: str = ""


class PrepareTurnInput(_Contract):
    """The first step of a turn: the user (created, or created again, as need be) and their message, stored."""

    message: IncomingMessage
    now: AwareDatetime  # the workflow's time: reminders and events count from it


class PreparedTurn(_Contract):
    """The stored user the turn speaks for, and the nudges the message gave rise to."""

    user: UserRef
    reminder: Nudge | None = None  # a reminder the message asked for, for the workflow to schedule
    follow_up: Nudge | None = None  # asking how an event the message mentioned went
    note: str | None = None  # what the reply should say of them (a reminder set), for generate_reply


class GenerateReplyInput(_Contract):
    """Write and store the reply to one stored message; the step reads the user's memory itself, so the prompt
    stays out of the workflow history."""

    user_id: int
    message_key: MessageKey
    reply_key: MessageKey
    text: str
    channel: Channel
    chat_id: int | None = None
    summary: str = ""  # the running summary of older conversation, carried by the workflow
    note: str | None = None


class GeneratedReply(_Contract):
    """The stored reply, and what the LLM call cost (None when an earlier attempt had already stored it)."""

    text: str
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class RememberInput(_Contract):
    """Remember a turn (and the turns answered while the previous remember step ran): index their messages, and
    extract structured memories from them when the worker does that. What is extracted is credited to the latest."""

    user_id: int
    message_key: MessageKey
    reply_key: MessageKey
    now: AwareDatetime
    summary: str = ""
    earlier: list[MessageKey] = Field(default_factory=list)  # message keys of earlier turns in the batch, oldest first

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(message key, reply key) of every turn to remember, oldest first."""
        return [*((key, reply_key_of(key)) for key in self.earlier), (self.message_key, self.reply_key)]


class Remembered(_Contract):
    """What the remember step kept of a turn, and what it hands back to the workflow."""

    memories: int = 0
    facts: int = 0
    events: int = 0
    milestones: int = 0
    reminders: list[Nudge] = Field(default_factory=list)  # reminders the user asked for, for the workflow to set
    summary: str | None = None  # the updated running summary, when extraction ran
    extracted: bool = False


class RecordNudgeInput(_Contract):
    """Write a nudge's audit record (idempotent by nudge id)."""

    user_id: int
    nudge: Nudge


class PlanCheckinInput(_Contract):
    """Record the next check-in, cancelling the one it replaces (one transaction)."""

    user_id: int
    replaces: str | None = None
    nudge: Nudge


class SetNudgeStatusInput(_Contract):
    """Mark a nudge cancelled or failed in its audit record."""

    nudge_id: str
    status: NudgeStatus
    error: str | None = None


class FireNudgeInput(_Contract):
    """Write (or take) a nudge's text, store it as the companion's message, and mark the nudge sent."""

    user_id: int
    nudge: Nudge
    channel: Channel
    now: AwareDatetime | None = None  # the workflow's time, for quiet hours


class FiredNudge(_Contract):
    """The text the user got; or, in the user's quiet hours, nothing yet and when to try again."""

    text: str
    postponed_until: AwareDatetime | None = None


class DeliverInput(_Contract):
    """Send a stored message to the user's Telegram chat; parts already sent are not sent again."""

    user_id: int
    chat_id: int
    message_key: MessageKey


class Delivery(_Contract):
    """How many Telegram messages the stored message took, and how many of them this step sent (none when the
    generate_reply step had sent the reply already)."""

    parts: int
    sent: int = 0


class SetUserActiveInput(_Contract):
    """Mark the user reachable again, or out of reach (their pending nudges are then cancelled)."""

    user_id: int
    active: bool
    reason: str | None = None


class ForgetInput(_Contract):
    """Erase everything the companion remembers of a user."""

    telegram_id: TelegramId


class Forgotten(_Contract):
    """What /forget erased."""

    had_memories: bool
    nudges_cancelled: int = 0
    # The run that erased them (it then continues as new without them), and how many closed runs of the user's
    # workflow were deleted from Temporal after it (their histories held what was erased).
    run_id: str | None = None
    runs_deleted: int = 0


class TimezoneSource(StrEnum):
    """Who said where the user lives."""

    COMMAND = "command"  # /timezone
    LOCATION = "location"  # a location the user shared
    OPERATOR = "operator"  # companion users set


class TimezoneChange(_Contract):
    """The user's time zone, from now on (an IANA name: core.zones makes one of what people type)."""

    zone: TimeZoneName
    source: TimezoneSource


class TimezoneChanged(_Contract):
    """The zone set, the one before, and the pending nudges that moved with it (soonest first)."""

    zone: str
    previous: str
    moved: list[Nudge] = Field(default_factory=list)


class SetTimezoneInput(_Contract):
    """Store the user's time zone; the pending nudges due at a time of day where they are move with it."""

    user_id: int
    change: TimezoneChange
    previous: str  # the zone the pending nudges' times were set in
    pending: list[Nudge] = Field(default_factory=list)
    now: AwareDatetime


class ListMemoryInput(_Contract):
    """List what the companion remembers of a user (/memory)."""

    user_id: int
    now: AwareDatetime


class MemoryListing(_Contract):
    """What the companion remembers of a user, in the order /memory numbers it, and their time zone to show it in."""

    timezone: str
    items: list[MemoryItem] = Field(default_factory=list)


class ForgetItemInput(_Contract):
    """Forget one fact, event or diary entry /memory listed (its ref)."""

    user_id: int
    ref: str


class SendExportInput(_Contract):
    """Send the user everything kept of them (/export) to a chat."""

    telegram_id: TelegramId
    chat_id: int


class Exported(_Contract):
    """How many rows an export held (0: nothing is kept of the user)."""

    rows: int


PersonaText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=PERSONA_MAX_CHARS)]


class PersonaChange(_Contract):
    """The companion's name and tone for one user (/persona): new ``text``, ``reset`` to its own, or neither (only
    asking which it is)."""

    text: PersonaText | None = None
    reset: bool = False


class SetPersonaInput(_Contract):
    """Store (or drop) a user's persona."""

    user_id: int
    change: PersonaChange
