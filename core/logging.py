"""structlog for everything: our own loggers and the stdlib ones (temporalio, sqlalchemy, alembic) alike."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import structlog
from pydantic import SecretStr
from structlog.typing import EventDict, Processor

APP_NAME = "companion"

# Keys whose values are secrets wherever they appear in a log event.
_SECRET_KEY = re.compile(r"(api[_-]?key|password|passwd|secret|authorization|credential|(^|_)token$)",
                         re.IGNORECASE)
# Secrets that slip into free text: bot tokens, OpenAI-style keys, passwords inside URLs.
_SECRET_TEXT = (
    (re.compile(r"(?<!\d)\d{5,}:[A-Za-z0-9_-]{30,}"), "[REDACTED-BOT-TOKEN]"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}\b"), "[REDACTED-KEY]"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1[REDACTED]@"),
)
REDACTED = "[REDACTED]"

# Libraries that are chatty at INFO; their warnings still come through.
_QUIET_LOGGERS = ("sqlalchemy.engine", "alembic.runtime.migration", "pgserver", "asyncio", "httpx", "httpcore",
                  "httpx2", "httpcore2")


def redact_text(text: str) -> str:
    """Text with anything that looks like a token, key or URL password replaced."""
    for pattern, replacement in _SECRET_TEXT:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, SecretStr) or (_SECRET_KEY.search(key) and value not in (None, "", False)):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    return value


def redact_secrets(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: never let a secret reach a log line."""
    return {key: _redact_value(key, value) for key, value in event_dict.items()}


def _add_app(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("app", APP_NAME)
    return event_dict


def _temporal_ids(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Inside an activity, the ids that lead from a log line to its workflow history in the Temporal UI.

    (Workflow code logs through temporalio's workflow.logger, which adds its own `temporal_workflow` context.)
    """
    from temporalio import activity

    if activity.in_activity():
        info = activity.info()
        event_dict.setdefault("workflow_id", info.workflow_id)
        event_dict.setdefault("run_id", info.workflow_run_id)
        event_dict.setdefault("activity", info.activity_type)
        event_dict.setdefault("activity_id", info.activity_id)
        event_dict.setdefault("attempt", info.attempt)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_app,
        _temporal_ids,
        structlog.processors.StackInfoRenderer(),
    ]


def log_formatter(fmt: str, colors: bool = False) -> logging.Formatter:
    """The formatter every handler of the app uses: JSON lines (``json``) or readable console lines, redacted."""
    final: list[Processor]
    if fmt == "json":
        # Frames without their local variables: locals can hold keys, tokens and whole prompts.
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False))
        final = [tracebacks, redact_secrets, structlog.processors.JSONRenderer()]
    else:
        final = [redact_secrets, structlog.dev.ConsoleRenderer(colors=colors)]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_shared_processors(),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )


class TracebackOnce(logging.Filter):
    """A failed activity attempt (the SDK's "Completing activity as failed") logs its traceback on the first attempt
    only; a retry logs one line with the error. An outage retried every few seconds then costs a line an attempt,
    not a traceback each."""

    def filter(self, record: logging.LogRecord) -> bool:
        activity = getattr(record, "temporal_activity", None)
        if record.exc_info and isinstance(activity, dict) and int(activity.get("attempt", 1)) > 1:
            error = record.exc_info[1]
            record.error = f"{type(error).__name__}: {error}" if error is not None else None
            record.exc_info, record.exc_text = None, None
        return True


_TRACEBACK_ONCE = TracebackOnce()


def configure_logging(level: str = "INFO", fmt: str = "console", stream: TextIO | None = None,
                      log_file: Path | None = None, console_level: str | None = None) -> None:
    """Route structlog and stdlib logging through one renderer: JSON lines or readable console.

    With ``log_file``, every record at ``level`` also goes to that file as JSON lines, and the console shows only
    ``console_level`` and above (so an interactive chat is not drowned in logs).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(log_formatter(fmt, colors=stream is None and sys.stderr.isatty()))
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        handler.setLevel(console_level or level)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(log_formatter("json"))
        handlers.append(file_handler)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    activities = logging.getLogger("temporalio.activity")
    if _TRACEBACK_ONCE not in activities.filters:
        activities.addFilter(_TRACEBACK_ONCE)

    structlog.configure(
        processors=[*_shared_processors(), structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **context: Any) -> Any:
    """A structlog logger with the given key-value context; lazy, so module-level loggers follow configure_logging."""
    return structlog.get_logger(name, **context)
