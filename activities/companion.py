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
from clients.llm import ChatModel
from clients.media import MediaModel
from clients.telegram import TelegramChannel
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
               extract: bool = False, media: MediaModel | None = None, **parts: object) -> CompanionActivities:
        """Every part over the same clients; ``parts`` (by field name) replace the parts made here."""
        made = {"conversation": ConversationActivities(repository, memory),
                "reply": ReplyActivities(repository, chat_model, memory, telegram),
                "delivery": DeliveryActivities(repository, telegram),
                "nudges": NudgeActivities(repository, chat_model, quiet_hours),
                "remember": RememberActivities(repository, memory, chat_model if extract else None),
                "media": MediaActivities(telegram, media)}
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
