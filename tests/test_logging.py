"""Logging: JSON lines in production, stdlib loggers routed through structlog, secrets never written."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from pydantic import SecretStr
from temporalio import activity
from temporalio.testing import ActivityEnvironment

from core.errors import DatabaseConnectionError
from core.logging import configure_logging, get_logger

BOT_TOKEN = "123456789:AAH9xYzQ1w2e3r4t5y6u7i8o9p0asdfghjk"


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    yield stream
    configure_logging("WARNING", "console")


def _records(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_timestamp_level_app_event_and_context(json_lines: io.StringIO) -> None:
    get_logger("companion.test", workflow_id="companion-user-42").info("turn.done", user_id=42, duration_ms=12)
    (record,) = _records(json_lines)
    assert record["event"] == "turn.done"
    assert record["level"] == "info"
    assert record["app"] == "companion"
    assert record["user_id"] == 42 and record["workflow_id"] == "companion-user-42"
    assert datetime.fromisoformat(record["timestamp"]).tzinfo is not None


def test_exceptions_are_logged_with_their_stack_but_not_their_locals(json_lines: io.StringIO) -> None:
    api_key = "sk-local-variable-secret-123456"  # noqa: F841 - a local the traceback must not show
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("companion.test").exception("turn.failed")
    (record,) = _records(json_lines)
    (exc,) = record["exception"]
    assert exc["exc_type"] == "ValueError" and exc["exc_value"] == "boom"
    assert exc["frames"][-1]["name"] == "test_exceptions_are_logged_with_their_stack_but_not_their_locals"
    assert "sk-local-variable-secret" not in json_lines.getvalue()
    assert "locals" not in exc["frames"][-1]


def test_stdlib_and_temporalio_loggers_go_through_structlog(json_lines: io.StringIO) -> None:
    logging.getLogger("temporalio.worker").warning("worker %s polling", "w1")
    (record,) = _records(json_lines)
    assert record["event"] == "worker w1 polling"
    assert record["logger"] == "temporalio.worker"
    assert record["app"] == "companion"


def test_secrets_never_reach_the_log(json_lines: io.StringIO) -> None:
    log = get_logger("companion.test")
    log.info("settings.loaded", telegram_bot_token=BOT_TOKEN, openai_api_key=SecretStr("sk-abc"),
             database_url="postgresql://companion:hunter2@db:5432/companion")
    log.info(f"calling https://api.telegram.org/bot{BOT_TOKEN}/getMe with sk-proj-1234567890abcdefghij")
    logging.getLogger("httpx").warning("POST https://api.telegram.org/bot%s/sendMessage failed", BOT_TOKEN)
    text = json_lines.getvalue()
    for secret in (BOT_TOKEN, "sk-abc", "hunter2", "sk-proj-1234567890abcdefghij"):
        assert secret not in text
    records = _records(json_lines)
    assert records[0]["telegram_bot_token"] == "[REDACTED]"
    assert records[0]["database_url"] == "postgresql://companion:[REDACTED]@db:5432/companion"
    assert len(records) == 3


def test_console_format_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "console", stream=stream)
    try:
        get_logger("companion.test").info("hello", user_id=1)
    finally:
        configure_logging("WARNING", "console")
    line = stream.getvalue()
    assert "hello" in line and "user_id=1" in line and not line.startswith("{")


def test_token_counts_are_not_mistaken_for_secrets(json_lines: io.StringIO) -> None:
    get_logger("companion.test").info("llm.reply", prompt_tokens=120, completion_tokens=30, bot_token="x:y")
    (record,) = _records(json_lines)
    assert (record["prompt_tokens"], record["completion_tokens"], record["bot_token"]) == (120, 30, "[REDACTED]")


async def test_a_retried_activity_logs_its_traceback_once_then_one_line_an_attempt(json_lines: io.StringIO) -> None:
    @activity.defn
    async def store() -> None:
        raise DatabaseConnectionError("PostgreSQL is down")

    worker_logger = logging.getLogger("temporalio.activity")
    for attempt in (1, 2, 3):
        environment = ActivityEnvironment()
        environment.info = dataclasses.replace(environment.info, attempt=attempt)

        async def fail_and_log() -> None:
            try:
                await store()
            except DatabaseConnectionError:  # as the SDK logs a failed attempt
                activity.logger.warning("Completing activity as failed", exc_info=True)

        await environment.run(activity.defn(name="store_and_log")(fail_and_log))
    records = [r for r in _records(json_lines) if r["event"].startswith("Completing activity as failed")]
    assert [r["temporal_activity"]["attempt"] for r in records] == [1, 2, 3]
    assert records[0]["exception"][0]["exc_value"] == "PostgreSQL is down" and worker_logger.filters
    assert all("exception" not in r and r["error"] == "DatabaseConnectionError: PostgreSQL is down"
               for r in records[1:])
