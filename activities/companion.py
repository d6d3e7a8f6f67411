"""Every activity of the companion, composed from one class per concern, and which task queue runs which."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time

from activities.conversation import ConversationActivities
from activities.delivery import DeliveryActivities
from activities.media import MediaActivities
from activities.nudges import NudgeActivities
from activities.remember import RememberActivities
from activities.reply import ReplyActivities
from activities.usage import UsageRecorder
from clients.llm import ChatModel
from clients.media import MediaModel
from clients.telegram import TelegramChannel
from core.usage import DEFAULT_PRICES, ModelPrice
from schemas.usage import Limits
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository


@dataclass
class CompanionActivities:
    """The activities a worker registers: the turn's and the nudges' storage steps, delivery, the reply, the
    remember step. A test swaps one part for its own subclass to inject failures around the real code."""

    conversation: ConversationActivities
    reply: ReplyActivities
    delivery: DeliveryActivities
    nudges: NudgeActivities
    remember: RememberActivities
    media: MediaActivities

    @classmethod
    def create(cls, repository: MemoryRepository, chat_model: ChatModel, telegram: TelegramChannel | None = None,
               quiet_hours: tuple[time, time] | None = None, memory: MemoryIndex | None = None,
               extract: bool = False, media: MediaModel | None = None,
               prices: dict[str, ModelPrice] | None = None, limits: Limits | None = None,
               **parts: object) -> CompanionActivities:
        """Every part over the same clients; ``parts`` (by field name) replace the parts made here. The model calls
        are recorded as usage, priced from ``prices`` (default: core.usage.DEFAULT_PRICES)."""
        usage = UsageRecorder(repository, DEFAULT_PRICES if prices is None else prices)
        made = {"conversation": ConversationActivities(repository, memory, limits),
                "reply": ReplyActivities(repository, chat_model, memory, telegram, usage),
                "delivery": DeliveryActivities(repository, telegram),
                "nudges": NudgeActivities(repository, chat_model, quiet_hours, usage),
                "remember": RememberActivities(repository, memory, chat_model if extract else None, usage),
                "media": MediaActivities(telegram, media, usage)}
        return cls(**{**made, **parts})  # type: ignore[arg-type]

    def local(self) -> list:
        """The steps the workflow runs as local activities, in its own workflow task: short PostgreSQL writes and
        the Telegram delivery."""
        return [*self.conversation.all(), *self.nudges.records(), *self.delivery.all()]

    def background(self) -> list:
        """The remember step: a regular activity on the workflow's task queue."""
        return self.remember.all()

    def llm(self) -> list:
        """The steps that call the LLM (and transcribe or describe what users send): regular activities on the LLM
        task queue, rate limited across workers."""
        return [*self.reply.all(), self.nudges.fire_nudge, *self.media.all()]
