"""Usage recorded per user: the model calls an activity made, written once it succeeds.

Each call becomes a row of the usage table keyed by the activity (its workflow run, activity id and the call's place
among the activity's calls): an attempt that succeeds after another one succeeded (its completion lost) counts
nothing twice. The user is the one whose workflow the activity serves (companion-user-<telegram id>).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio import activity

from core.errors import CompanionError
from core.logging import get_logger
from core.usage import ModelCall, ModelPrice, UsageKind, collecting, price_of
from schemas.usage import UsageCreate
from storage.repository import MemoryRepository
from workflows.contract import telegram_id_of

R = TypeVar("R")

# The clients' names for their calls, as kinds of usage; a reply written by fire_nudge is a nudge.
KINDS = {"reply": UsageKind.REPLY, "memory_extraction": UsageKind.EXTRACTION, "embedding": UsageKind.EMBEDDING,
         "transcribe": UsageKind.TRANSCRIPTION, "describe_image": UsageKind.VISION}

_log = get_logger(__name__)
_unpriced: set[str] = set()


class UsageRecorder:
    """Writes the model calls of an activity to the usage table, priced from ``prices``."""

    def __init__(self, repository: MemoryRepository, prices: dict[str, ModelPrice]):
        self._repository, self._prices = repository, prices

    async def record(self, calls: list[ModelCall]) -> None:
        """Store the calls (best effort: a usage row that can't be written never fails the step that paid)."""
        info = activity.info()
        telegram_id = telegram_id_of(info.workflow_id or "")
        if telegram_id is None:
            return
        rows = []
        for n, call in enumerate(calls):
            cost = price_of(call, self._prices)
            kind = KINDS.get(call.purpose, UsageKind.REPLY)
            if info.activity_type == "fire_nudge" and kind == UsageKind.REPLY:
                kind = UsageKind.NUDGE
            rows.append(UsageCreate(
                idempotency_key=f"{info.workflow_run_id}/{info.activity_id}/{n}", telegram_id=telegram_id,
                kind=kind, model=call.model, prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens, cached_tokens=call.cached_tokens,
                audio_seconds=call.audio_seconds, images=call.images, cost_usd=cost or 0.0, priced=cost is not None))
        try:
            new = await self._repository.record_usage(rows)
        except CompanionError as exc:
            _log.warning("usage.not_recorded", telegram_id=telegram_id, calls=len(rows), error=exc.code)
            return
        if new:
            counter = activity.metric_meter().create_counter("companion_usage_cost_microdollars",
                                                             "what model calls cost, in millionths of a US dollar")
            for row in rows:
                counter.with_additional_attributes({"model": row.model, "kind": row.kind.value}).add(
                    round(row.cost_usd * 1_000_000))
                if not row.priced and row.model not in _unpriced:
                    _unpriced.add(row.model)  # said once a worker
                    _log.warning("usage.unpriced_model", model=row.model, hint="add it to MODEL_PRICES")


def records_usage(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Record the model calls of an activity method once it succeeds (its class's ``_usage``: a UsageRecorder, or
    None for none)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> R:
        with collecting() as calls:
            result = await fn(self, *args, **kwargs)
        if calls and self._usage is not None:
            await self._usage.record(calls)
        return result

    return wrapper
