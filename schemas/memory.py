"""Create / Update / Read models for every memory entity the repository stores."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


def _valid_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}; expected an IANA name like Europe/Berlin") from None
    return name


# Characters that change how text around them is shown without being seen: bidi overrides and isolates (U+202E
# shows "gnp.exe" as "exe.png"), and zero-width spaces and joiners other than the ZWJ of emoji sequences. A name
# holding them reads one way to the user and another in the prompt and in operators' views.
_INVISIBLE = dict.fromkeys([0x061C, 0x200B, 0x200C, 0x200E, 0x200F, *range(0x202A, 0x202F), 0x2060,
                            *range(0x2066, 0x206A), 0xFEFF])


def clean_name(name: object) -> object:
    """A name without invisible formatting characters, stripped; None when nothing is left."""
    if not isinstance(name, str):
        return name
    return name.translate(_INVISIBLE).strip() or None


def display_name(first_name: str | None, last_name: str | None, username: str | None, telegram_id: int) -> str:
    """The name to call a user by: their full name, else their username, else their id."""
    full = " ".join(part for part in (first_name, last_name) if part)
    return full or username or f"user {telegram_id}"


TelegramId = Annotated[int, Field(gt=0, lt=2**63)]
UserName = Annotated[str | None, BeforeValidator(clean_name)]
TimeZoneName = Annotated[str, AfterValidator(_valid_timezone)]
ShortText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
LongText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=10_000)]
FactKey = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=100,
                                           pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")]
MessageKey = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")]
SourceKeys = Annotated[list[MessageKey], Field(default_factory=list, max_length=100)]


class FactCategory(StrEnum):
    """What a profile fact is about."""

    PERSONAL = "personal"
    RELATIONSHIPS = "relationships"
    WORK = "work"
    EDUCATION = "education"
    HEALTH = "health"
    HOBBIES = "hobbies"
    PREFERENCES = "preferences"
    GOALS = "goals"
    LOCATION = "location"
    OTHER = "other"


class Role(StrEnum):
    """Who said a message."""

    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"


class Channel(StrEnum):
    """Where a message came from and where its reply goes."""

    TELEGRAM = "telegram"
    CONSOLE = "console"


class DiaryKind(StrEnum):
    """The kind of a diary entry."""

    MILESTONE = "milestone"
    REFLECTION = "reflection"
    NOTE = "note"


class MemoryKind(StrEnum):
    """What a unit of semantic memory was made from."""

    CONVERSATION = "conversation"
    FACT = "fact"
    EVENT = "event"
    DIARY = "diary"
    SUMMARY = "summary"


class NudgeKind(StrEnum):
    """Why a proactive message exists."""

    REMINDER = "reminder"
    FOLLOW_UP = "follow_up"
    CHECK_IN = "check_in"
    CUSTOM = "custom"


class NudgeCreator(StrEnum):
    """Who asked for a proactive message."""

    COMPANION = "companion"
    USER = "user"
    OPERATOR = "operator"


class NudgeStatus(StrEnum):
    """Where a proactive message is in its life."""

    PENDING = "pending"
    SENT = "sent"
    CANCELLED = "cancelled"
    FAILED = "failed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --- users ------------------------------------------------------------------------------------------------------


class UserCreate(_Model):
    """A user as first seen on a channel."""

    telegram_id: TelegramId
    username: UserName = Field(default=None, max_length=64)
    first_name: UserName = Field(default=None, max_length=128)
    last_name: UserName = Field(default=None, max_length=128)
    language_code: str | None = Field(default=None, max_length=16)
    timezone: TimeZoneName = "UTC"


class UserUpdate(_Model):
    """Changes to a user; fields left unset stay as they are."""

    username: UserName = Field(default=None, max_length=64)
    first_name: UserName = Field(default=None, max_length=128)
    last_name: UserName = Field(default=None, max_length=128)
    language_code: str | None = Field(default=None, max_length=16)
    timezone: TimeZoneName | None = None
    is_active: bool | None = None
    preferences: dict[str, Any] | None = None


# Keys of a user's preferences: who set their time zone (absent: nobody, and it is UTC by default), and whether the
# companion has asked them for it.
TIMEZONE_SOURCE = "timezone_source"
TIMEZONE_ASKED = "timezone_asked"
PERSONA = "persona"  # how the user asked the companion to be with them (/persona)
UNLIMITED = "unlimited"  # an operator exempted the user from the budget and the rate limit
PERSONA_MAX_CHARS = 500


class UserRead(_Read):
    """A stored user."""

    id: int
    telegram_id: int
    username: str | None
    first_name: str | None
    last_name: str | None
    language_code: str | None
    timezone: str
    is_active: bool
    preferences: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    last_seen_at: datetime | None

    @property
    def display_name(self) -> str:
        """The name to call the user by."""
        return display_name(self.first_name, self.last_name, self.username, self.telegram_id)

    @property
    def timezone_info(self) -> ZoneInfo:
        """The user's time zone, for showing them times."""
        return ZoneInfo(self.timezone)

    @property
    def persona(self) -> str | None:
        """How the user asked the companion to be with them (its name, its tone), or None."""
        persona = self.preferences.get(PERSONA)
        return persona if isinstance(persona, str) and persona else None

    @property
    def timezone_known(self) -> bool:
        """Whether the user's time zone was set (by them or an operator), rather than UTC by default."""
        return TIMEZONE_SOURCE in self.preferences


# --- profile facts ----------------------------------------------------------------------------------------------


class ProfileFactCreate(_Model):
    """A fact about the user, e.g. (work, employer, "Acme")."""

    category: FactCategory
    key: FactKey
    value: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2_000)]
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)
    source_keys: SourceKeys


class ProfileFactRead(_Read):
    """A stored fact; valid_to is set once a newer value superseded it."""

    id: int
    user_id: int
    category: FactCategory
    key: str
    value: str
    confidence: float
    source_keys: list[str]
    valid_from: datetime
    valid_to: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def is_current(self) -> bool:
        """True while no newer value has replaced this one."""
        return self.valid_to is None


# --- conversations ----------------------------------------------------------------------------------------------


class MessageCreate(_Model):
    """One message of a conversation; message_key makes a retried write land once."""

    message_key: MessageKey
    role: Role
    content: Annotated[str, StringConstraints(max_length=64_000)]
    channel: Channel = Channel.CONSOLE
    sent_at: AwareDatetime
    meta: dict[str, Any] = Field(default_factory=dict)


class MessageRead(_Read):
    """A stored message."""

    id: int
    user_id: int
    message_key: str
    role: Role
    content: str
    channel: Channel
    sent_at: datetime
    meta: dict[str, Any]
    created_at: datetime


# --- timeline events --------------------------------------------------------------------------------------------


class TimelineEventCreate(_Model):
    """Something that happens at a time in the user's life (an interview, a trip)."""

    title: ShortText
    description: LongText | None = None
    event_at: AwareDatetime
    category: ShortText = "general"
    source_keys: SourceKeys
    idempotency_key: MessageKey | None = None


class TimelineEventRead(_Read):
    """A stored timeline event."""

    id: int
    user_id: int
    title: str
    description: str | None
    event_at: datetime
    category: str
    source_keys: list[str]
    created_at: datetime


# --- diary ------------------------------------------------------------------------------------------------------


class DiaryEntryCreate(_Model):
    """A milestone or reflection worth remembering."""

    title: ShortText
    content: LongText
    kind: DiaryKind = DiaryKind.MILESTONE
    importance: int = Field(default=3, ge=1, le=5)
    occurred_at: AwareDatetime
    source_keys: SourceKeys
    idempotency_key: MessageKey | None = None


class DiaryEntryRead(_Read):
    """A stored diary entry."""

    id: int
    user_id: int
    title: str
    content: str
    kind: DiaryKind
    importance: int
    occurred_at: datetime
    source_keys: list[str]
    created_at: datetime


# --- scheduled messages (nudges) --------------------------------------------------------------------------------


class ScheduledMessageCreate(_Model):
    """A proactive message to send at a time: given text, or a purpose to write it from."""

    nudge_id: MessageKey
    scheduled_for: AwareDatetime
    content: LongText | None = None
    purpose: LongText | None = None
    kind: NudgeKind = NudgeKind.CUSTOM
    created_by: NudgeCreator = NudgeCreator.COMPANION
    source_keys: SourceKeys


class ScheduledMessageUpdate(_Model):
    """A change of a scheduled message's status, time or text."""

    status: NudgeStatus | None = None
    scheduled_for: AwareDatetime | None = None
    content: LongText | None = None
    error: str | None = Field(default=None, max_length=2_000)


class ScheduledMessageRead(_Read):
    """A stored scheduled message: the audit record of one nudge."""

    id: int
    user_id: int
    nudge_id: str
    scheduled_for: datetime
    content: str | None
    purpose: str | None
    kind: NudgeKind
    created_by: NudgeCreator
    status: NudgeStatus
    source_keys: list[str]
    error: str | None
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    cancelled_at: datetime | None


# --- what the user sees of their memory (/memory) ---------------------------------------------------------------


class MemoryItemKind(StrEnum):
    """The kinds of things /memory lists, in the order it lists them."""

    FACT = "fact"
    EVENT = "event"
    DIARY = "diary"
    NUDGE = "nudge"


class MemoryItem(_Model):
    """One thing the companion remembers of a user, as they see it: ``ref`` ("fact:12", "nudge:remind-…") names it
    for forgetting, ``source`` is the message it was learned from."""

    ref: str
    kind: MemoryItemKind
    text: str
    at: datetime | None = None  # when it happens: an event, a nudge
    learned_at: datetime
    source: str | None = None


_MEMORY_HEADINGS = {MemoryItemKind.FACT: "About you", MemoryItemKind.EVENT: "Coming up",
                    MemoryItemKind.DIARY: "Moments that mattered", MemoryItemKind.NUDGE: "Messages I plan to send you"}


def describe_memory(items: list[MemoryItem], zone: ZoneInfo) -> str:
    """The items as a person reads them on a phone, numbered as /memory forget takes them, under a heading per kind,
    each with when it was learned and the message it came from; times in ``zone``."""
    if not items:
        return "I don't remember anything about you yet."
    lines = ["What I remember of you:"]
    for number, item in enumerate(items, start=1):
        if number == 1 or items[number - 2].kind != item.kind:
            lines += ["", _MEMORY_HEADINGS[item.kind]]
        when = f"{item.at.astimezone(zone):%a %d %b %Y, %H:%M}: " if item.at is not None else ""
        lines.append(f"{number}. {when}{_clip(item.text, 200)}")
        source = f' from "{_clip(item.source, 80)}"' if item.source else ""
        lines.append(f"    learned {item.learned_at.astimezone(zone):%a %d %b %Y}{source}")
    return "\n".join(lines)


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"
