"""The one place where our errors become Temporal failures: typed, retryable or not, with structured details."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import ParamSpec, TypeVar

from temporalio.exceptions import ApplicationError

from core.errors import CompanionError

P = ParamSpec("P")
R = TypeVar("R")


def application_error(exc: CompanionError) -> ApplicationError:
    """The ApplicationError for one of our errors: its class name as type, its dict as details."""
    retry_after = exc.context.get("retry_after_s")
    return ApplicationError(
        f"{exc.message} [{exc.code}]",
        exc.to_dict(),
        type=type(exc).__name__,
        non_retryable=not exc.retryable,
        next_retry_delay=timedelta(seconds=float(retry_after)) if retry_after else None,
    )


def translate_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap an activity so that CompanionErrors leave it as ApplicationErrors."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except CompanionError as exc:
            raise application_error(exc) from exc

    return wrapper
