"""The remember step: after a turn, what the companion keeps of it.

Two parts. The turn's messages become searchable memories (stretches of conversation, embedded and indexed). Then,
when extraction is on, one LLM call with a JSON schema (llama.cpp constrains the local model's output to it; OpenAI
uses structured outputs) reads the recent turns and returns profile facts, timeline events, diary milestones,
reminders and an updated running summary. Facts are upserted by (category, key): a new value supersedes the old one,
which stays in the table with its valid_to. Every memory keeps the message keys it came from.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio import activity
from temporalio.common import RetryPolicy

from activities.errors import translate_errors
from activities.reminders import parse_reminder
from activities.usage import UsageRecorder, records_usage
from clients.llm import ChatModel
from core.errors import OpenAIServiceError
from core.logging import get_logger
from schemas.context import quote
from schemas.memory import (
    DiaryEntryCreate,
    DiaryKind,
    FactCategory,
    MemoryKind,
    MessageRead,
    NudgeCreator,
    NudgeKind,
    ProfileFactCreate,
    ProfileFactRead,
    Role,
    TimelineEventCreate,
    UserRead,
)
from schemas.turn import Nudge, Remembered, RememberInput
from storage.recall import MemoryIndex, NewMemory, speaker_of
from storage.repository import MemoryRepository

EXTRACTION_TURNS = 6  # messages of context the extraction reads, the turn's two included
EXTRACTION_MAX_TOKENS = 700
SUMMARY_MAX_CHARS = 1_500
_MAX_ITEMS = 8
# The remember step: storing and embedding is retried until it lands; the extraction call inside it is paid, so
# after this many attempts the step finishes without it.
REMEMBER_TIMEOUT = timedelta(seconds=120)
REMEMBER_RETRY = RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                             maximum_interval=timedelta(minutes=1), maximum_attempts=10,
                             non_retryable_error_types=["InvalidMemoryDataError", "UserNotFoundError",
                                                        "ConstraintViolationError"])
REMEMBER_EXTRACT_ATTEMPTS = 3
_DEFAULT_HOUR = time(9, 0)

_log = get_logger(__name__)


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ExtractedFact(_Item):
    category: FactCategory
    key: str = Field(min_length=1, max_length=100)
    value: str = Field(min_length=1, max_length=500)


class ExtractedEvent(_Item):
    title: str = Field(min_length=1, max_length=200)
    when: str = Field(min_length=4, max_length=40)


class ExtractedMilestone(_Item):
    title: str = Field(min_length=1, max_length=200)
    content: str = Field(min_length=1, max_length=2_000)
    importance: int = Field(default=3, ge=1, le=5)


class ExtractedReminder(_Item):
    what: str = Field(min_length=1, max_length=300)
    when: str = Field(min_length=4, max_length=40)


def _strict(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_TEXT = {"type": "string"}
_WHEN = {"type": "string", "description": "local date and time, ISO 8601 (YYYY-MM-DDTHH:MM) or a date"}
EXTRACTION_SCHEMA: dict[str, Any] = _strict({
    "facts": {"type": "array", "maxItems": _MAX_ITEMS, "items": _strict({
        "category": {"type": "string", "enum": [c.value for c in FactCategory]},
        "key": {"type": "string", "description": "short snake_case name, e.g. employer, sister_name, city"},
        "value": _TEXT})},
    "events": {"type": "array", "maxItems": _MAX_ITEMS, "items": _strict({"title": _TEXT, "when": _WHEN})},
    "milestones": {"type": "array", "maxItems": _MAX_ITEMS, "items": _strict({
        "title": _TEXT, "content": _TEXT, "importance": {"type": "integer", "minimum": 1, "maximum": 5}})},
    "reminders": {"type": "array", "maxItems": _MAX_ITEMS, "items": _strict({"what": _TEXT, "when": _WHEN})},
    "summary": {"type": "string", "description": "the running summary of the whole conversation, updated"},
})

EXTRACTION_PROMPT = """You keep the memory of a companion who chats with {name}. Read the conversation below and
return JSON with what is worth remembering about {name} from the NEW messages only:
- facts: lasting facts about {name} (category, a short snake_case key, value). Reuse a key from the known facts when
  the same fact changes (e.g. a new employer keeps key "employer").
- events: things happening in {name}'s life at a date (an interview, a trip, a birthday), with their local time.
- milestones: important moments for {name} (a new job, a move, a loss), with importance 1-5.
- reminders: only what {name} explicitly asked to be reminded of, with the local time.
- summary: the running summary updated with the new messages, at most 80 words.
Leave lists empty when there is nothing. Never invent anything. Now is {now} ({zone}).
Known facts: {facts}
Running summary so far: {summary}"""


class Extraction(BaseModel):
    """What one extraction call found; items that don't validate are dropped one by one."""

    facts: list[ExtractedFact] = Field(default_factory=list)
    events: list[ExtractedEvent] = Field(default_factory=list)
    milestones: list[ExtractedMilestone] = Field(default_factory=list)
    reminders: list[ExtractedReminder] = Field(default_factory=list)
    summary: str = ""

    @classmethod
    def parse(cls, raw: str) -> Extraction:
        """Read the model's JSON leniently: a bad item is skipped, a bad document is an OpenAIServiceError."""
        try:
            data = json.loads(raw)
        except ValueError as exc:
            # Cut off at the token limit, most likely: the same call would be cut off again.
            raise OpenAIServiceError("the extraction answer is not JSON", context={"chars": len(raw)},
                                     retryable=False) from exc
        if not isinstance(data, dict):
            raise OpenAIServiceError("the extraction answer is not a JSON object", retryable=False)
        kept: dict[str, Any] = {"summary": str(data.get("summary") or "")[:SUMMARY_MAX_CHARS]}
        for name, item_type in (("facts", ExtractedFact), ("events", ExtractedEvent),
                                ("milestones", ExtractedMilestone), ("reminders", ExtractedReminder)):
            items = data.get(name) if isinstance(data.get(name), list) else []
            valid = []
            for item in items[:_MAX_ITEMS]:
                try:
                    valid.append(item_type.model_validate(item))
                except ValidationError:
                    _log.info("memory.extraction_item_dropped", kind=name)
            kept[name] = valid
        return cls(**kept)


def parse_when(text: str, zone: ZoneInfo) -> datetime | None:
    """An extracted time as an aware datetime: a naive one is the user's local time, a bare date 09:00 local."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            moment = datetime.combine(datetime.fromisoformat(text.strip()[:10]).date(), _DEFAULT_HOUR)
        except ValueError:
            return None
    if len(text.strip()) == 10:  # a bare date
        moment = datetime.combine(moment.date(), _DEFAULT_HOUR)
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


def past_fact_memory(fact: ProfileFactRead, name: str, zone: ZoneInfo) -> NewMemory:
    """The memory of a fact's superseded value: said as what was true until it changed, never as current."""
    assert fact.valid_to is not None
    until = fact.valid_to.astimezone(zone)
    return NewMemory(key=f"fact:{fact.category.value}:{fact.key}:{fact.id}", kind=MemoryKind.FACT,
                     content=f"Until {until.day} {until:%B %Y}, {name}'s {fact.key.replace('_', ' ')} "
                             f"({fact.category.value}) was {fact.value}; it no longer is.",
                     occurred_at=fact.valid_from, source_keys=fact.source_keys)


def derived_key(kind: str, message_key: str, label: str | None = None) -> str:
    """The key of something a message gave rise to: one per message, kind and (case- and space-blind) label,
    whatever the retries, even those that extract it again."""
    text = message_key if label is None else f"{message_key}\n{' '.join(label.casefold().split())}"
    return f"{kind}-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _fact_key(key: str) -> str:
    return "_".join(key.strip().lower().replace("-", " ").split())[:100] or "fact"


class Rememberer:
    """Turns stored messages into memories, and (with a chat model) extracts and applies structured memories."""

    def __init__(self, repository: MemoryRepository, index: MemoryIndex, chat_model: ChatModel | None):
        self._repository = repository
        self._index = index
        self._chat_model = chat_model

    @property
    def extracts(self) -> bool:
        """True when this rememberer runs the LLM extraction."""
        return self._chat_model is not None

    async def index_messages(self, user: UserRead, keys: list[str]) -> tuple[int, list[MessageRead]]:
        """Index the stored messages ``keys`` as memories: how many were written, and those messages as stored
        (one read serves both)."""
        window = await self._index.window(user.id, keys)
        indexed = await self._index.remember_window(user.id, window, keys, user.display_name)
        wanted = set(keys)
        return len(indexed), [message for message in window if message.message_key in wanted]

    async def extract(self, user: UserRead, keys: list[str], now: datetime, summary: str) -> Extraction:
        """One LLM call over the recent turns, the messages ``keys`` marked new."""
        assert self._chat_model is not None
        recent = await self._repository.recent_messages(user.id, limit=EXTRACTION_TURNS + len(keys))
        facts = await self._repository.list_profile_facts(user.id)
        zone = user.timezone_info
        known = "; ".join(f"{f.category.value}/{f.key}={quote(f.value)}" for f in facts[:50]) or "none"
        lines = []
        for message in recent:
            if message.role == Role.SYSTEM or message.meta.get("fallback"):
                continue
            who = speaker_of(message, user.display_name)
            mark = "NEW " if message.message_key in keys else ""
            lines.append(f"{mark}[{message.sent_at.astimezone(zone):%Y-%m-%d %H:%M}] {who}: {quote(message.content)}")
        system = EXTRACTION_PROMPT.format(name=user.display_name, now=f"{now.astimezone(zone):%A %Y-%m-%d %H:%M}",
                                          zone=user.timezone, facts=known, summary=quote(summary or "none"))
        raw = await self._chat_model.complete_json(system, "\n".join(lines), "memory_extraction",
                                                   EXTRACTION_SCHEMA, EXTRACTION_MAX_TOKENS)
        return Extraction.parse(raw)

    async def apply(self, user: UserRead, source_key: str, found: Extraction, now: datetime) -> Remembered:
        """Store what was extracted, each with ``source_key`` as provenance; returns counts and reminder nudges."""
        zone = user.timezone_info
        memories: list[NewMemory] = []
        facts = 0
        changed: set[tuple[str, str]] = set()
        for fact in found.facts:
            stored = await self._repository.upsert_profile_fact(user.id, ProfileFactCreate(
                category=fact.category, key=_fact_key(fact.key), value=fact.value, source_keys=[source_key]))
            facts += 1
            memories.append(NewMemory(key=f"fact:{stored.category.value}:{stored.key}", kind=MemoryKind.FACT,
                                      content=f"{user.display_name}'s {stored.key.replace('_', ' ')} "
                                              f"({stored.category.value}): {stored.value}",
                                      occurred_at=stored.valid_from, source_keys=stored.source_keys))
            changed.add((stored.category.value, stored.key))
        if changed:  # a value a new one superseded stays findable, as what was true until then
            history = await self._repository.list_profile_facts(user.id, include_history=True)
            memories += [past_fact_memory(old, user.display_name, zone) for old in history
                         if old.valid_to is not None and (old.category.value, old.key) in changed]
        events = 0
        for event in found.events:
            at = parse_when(event.when, zone)
            if at is None:
                continue
            key = derived_key("xevent", source_key, event.title)
            stored_event = await self._repository.add_timeline_event(user.id, TimelineEventCreate(
                title=event.title[:200], event_at=at, source_keys=[source_key], idempotency_key=key))
            events += 1
            memories.append(NewMemory(key=f"event:{key}",
                                      kind=MemoryKind.EVENT, content=f"{at.astimezone(zone):%A %Y-%m-%d %H:%M}: "
                                                                     f"{stored_event.title}",
                                      occurred_at=at, source_keys=stored_event.source_keys))
        milestones = 0
        for milestone in found.milestones:
            key = derived_key("diary", source_key, milestone.title)
            entry = await self._repository.add_diary_entry(user.id, DiaryEntryCreate(
                title=milestone.title[:200], content=milestone.content, kind=DiaryKind.MILESTONE,
                importance=milestone.importance, occurred_at=now, source_keys=[source_key], idempotency_key=key))
            milestones += 1
            memories.append(NewMemory(key=f"diary:{key}", kind=MemoryKind.DIARY,
                                      content=f"{entry.title}: {entry.content}", occurred_at=entry.occurred_at,
                                      source_keys=entry.source_keys))
        reminders = []
        for reminder in found.reminders:
            at = parse_when(reminder.when, zone)
            if at is None or at <= now:
                continue
            reminders.append(Nudge(nudge_id=derived_key("remind", source_key, reminder.what), at=at,
                                   text=f"⏰ Reminder: {reminder.what}", kind=NudgeKind.REMINDER,
                                   created_by=NudgeCreator.USER, local_time=True))
        await self._index.add(user.id, memories)
        return Remembered(facts=facts, events=events, milestones=milestones, reminders=reminders,
                          summary=found.summary or None)

    async def extract_and_apply(self, user_id: int, keys: list[str], now: datetime | None = None,
                                summary: str = "") -> Remembered:
        """Extraction and its application over stored messages (the benchmark's --extract uses this directly)."""
        user = await self._repository.get_user(user_id)
        if now is None:
            last = await self._repository.get_message(user_id, keys[-1])
            now = last.sent_at if last is not None else datetime.now(zone := user.timezone_info).astimezone(zone)
        found = await self.extract(user, keys, now, summary)
        return await self.apply(user, keys[0], found, now)



class RememberActivities:
    """The remember step, over an injected repository, memory index and (when extraction is on) chat model."""

    def __init__(self, repository: MemoryRepository, memory: MemoryIndex | None = None,
                 chat_model: ChatModel | None = None, usage: UsageRecorder | None = None):
        self._repository, self._usage = repository, usage
        self._rememberer = Rememberer(repository, memory, chat_model) if memory is not None else None

    @activity.defn(name="remember")
    @translate_errors
    @records_usage
    async def remember(self, data: RememberInput) -> Remembered:
        """Keep what the turn said: its messages as searchable memories, then (when on) the LLM's extraction.

        Off the reply's critical path: the workflow runs it after the reply is out. An extraction that fails leaves
        the indexed messages in place; the turn is remembered either way.
        """
        if self._rememberer is None:
            return Remembered()
        user = await self._repository.get_user(data.user_id)
        keys = [key for turn in data.turns for key in turn]  # a key with no stored message is passed over
        indexed, stored = await self._rememberer.index_messages(user, keys)
        said = {message for message, _ in data.turns}
        messages = [message for message in stored if message.message_key in said]  # the user's, not the replies
        if not self._rememberer.extracts or not messages or activity.info().attempt > REMEMBER_EXTRACT_ATTEMPTS:
            return Remembered(memories=indexed)  # past its attempts, the paid call is not made again
        try:
            found = await self._rememberer.extract(user, keys, data.now, data.summary)
        except OpenAIServiceError as exc:
            if exc.retryable and activity.info().attempt < REMEMBER_EXTRACT_ATTEMPTS:
                raise
            _log.warning("memory.extraction_failed", user_id=data.user_id, message_key=data.message_key,
                         error=exc.code, detail=exc.message)
            return Remembered(memories=indexed)
        remembered = await self._rememberer.apply(user, data.message_key, found, data.now)
        _log.info("memory.remembered", user_id=data.user_id, message_key=data.message_key, turns=len(data.turns),
                  memories=indexed, facts=remembered.facts, events=remembered.events,
                  milestones=remembered.milestones, reminders=len(remembered.reminders))
        # A reminder the plain parser already set for one of these messages (prepare_turn) is not set twice.
        parsed = any(parse_reminder(message.content, data.now, user.timezone_info) for message in messages)
        reminders = [] if parsed else remembered.reminders
        return remembered.model_copy(update={"memories": indexed, "reminders": reminders, "extracted": True})

    def all(self) -> list:
        """Every activity of this class, for registering with a worker."""
        return [self.remember]
