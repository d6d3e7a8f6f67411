"""What the paid model calls cost: each call noted as it returns, priced from a table of USD per million tokens.

The clients note their calls (`note_call`); an activity that calls models collects them (`collecting`) and writes
them once it succeeds (activities.usage.records_usage), so usage is counted per user without threading it through
every return value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class UsageKind(StrEnum):
    """What a model call was for."""

    REPLY = "reply"
    EXTRACTION = "extraction"
    EMBEDDING = "embedding"
    TRANSCRIPTION = "transcription"
    VISION = "vision"
    NUDGE = "nudge"


class ModelPrice(BaseModel):
    """A model's price in USD: per million tokens in and out (cached input at its own price when it has one), or per
    minute of audio (whisper-1)."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(default=0.0, ge=0)
    output: float = Field(default=0.0, ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    audio_minute: float = Field(default=0.0, ge=0)


# OpenAI's list prices when this table was written (USD; per million tokens). MODEL_PRICES (JSON, the same shape)
# adds models or changes these; a model in neither costs 0 and its usage is flagged as unpriced.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(input=0.15, cached_input=0.075, output=0.60),
    "gpt-4o": ModelPrice(input=2.50, cached_input=1.25, output=10.00),
    "gpt-4.1": ModelPrice(input=2.00, cached_input=0.50, output=8.00),
    "gpt-4.1-mini": ModelPrice(input=0.40, cached_input=0.10, output=1.60),
    "gpt-4.1-nano": ModelPrice(input=0.10, cached_input=0.025, output=0.40),
    "text-embedding-3-small": ModelPrice(input=0.02),
    "text-embedding-3-large": ModelPrice(input=0.13),
    "gpt-4o-mini-transcribe": ModelPrice(input=3.00, output=5.00),  # audio tokens in, text out
    "gpt-4o-transcribe": ModelPrice(input=6.00, output=10.00),
    "whisper-1": ModelPrice(audio_minute=0.006),
}


@dataclass
class ModelCall:
    """One model call that answered, and what it consumed."""

    purpose: str  # the client's name for it: reply, memory_extraction, embedding, transcribe, describe_image
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    audio_seconds: float = 0.0
    images: int = 0


_calls: ContextVar[list[ModelCall] | None] = ContextVar("companion_model_calls", default=None)


def note_call(call: ModelCall) -> None:
    """Count a model call that answered, for whoever is collecting (nobody outside an activity that records usage)."""
    calls = _calls.get()
    if calls is not None:
        calls.append(call)


@contextmanager
def collecting() -> Iterator[list[ModelCall]]:
    """The model calls made inside the block, in order."""
    calls: list[ModelCall] = []
    token = _calls.set(calls)
    try:
        yield calls
    finally:
        _calls.reset(token)


def price_of(call: ModelCall, prices: dict[str, ModelPrice]) -> float | None:
    """The call's cost in USD; None when the model has no price."""
    price = prices.get(call.model)
    if price is None:
        return None
    cached = min(call.cached_tokens, call.prompt_tokens)
    cached_price = price.input if price.cached_input is None else price.cached_input
    per_million = ((call.prompt_tokens - cached) * price.input + cached * cached_price
                   + call.completion_tokens * price.output)
    return per_million / 1_000_000 + call.audio_seconds / 60 * price.audio_minute
