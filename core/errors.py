"""One exception hierarchy for the whole companion.

Every error carries a machine-readable ``code``, a human ``message``, structured ``context`` and whether a retry
could help (``retryable``). ``to_dict()`` gives a JSON-safe form for logs, APIs and Temporal failure details.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CompanionError(Exception):
    """Base of every error the companion raises on purpose."""

    code: ClassVar[str] = "COMPANION_ERROR"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, context: dict[str, Any] | None = None, cause: BaseException | None = None,
                 retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = dict(context or {})
        if retryable is not None:  # the class gives the usual answer; a given failure may know better
            self.retryable = retryable
        if cause is not None:
            self.__cause__ = cause

    def to_dict(self) -> dict[str, Any]:
        """The error as a JSON-safe dict: type, code, message, retryable, context and the cause's type."""
        data: dict[str, Any] = {
            "type": type(self).__name__,
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "context": {key: _json_safe(value) for key, value in self.context.items()},
        }
        if self.__cause__ is not None:
            data["cause"] = type(self.__cause__).__name__
        return data

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, context={self.context!r})"


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    return str(value)


# --- database ---------------------------------------------------------------------------------------------------


class DatabaseError(CompanionError):
    """A failure talking to PostgreSQL."""

    code = "DATABASE_ERROR"


class RecordNotFoundError(DatabaseError):
    """The row asked for does not exist."""

    code = "DATABASE_RECORD_NOT_FOUND"


class ConstraintViolationError(DatabaseError):
    """A write broke a constraint (foreign key, check, not-null)."""

    code = "DATABASE_CONSTRAINT_VIOLATION"


class DuplicateRecordError(ConstraintViolationError):
    """A write broke a unique constraint."""

    code = "DATABASE_DUPLICATE_RECORD"


class DatabaseConnectionError(DatabaseError):
    """PostgreSQL could not be reached, or kept failing transiently after retries."""

    code = "DATABASE_CONNECTION_ERROR"
    retryable = True


class SchemaMissingError(DatabaseError):
    """The tables the code needs are not there (a downgrade, a restore in progress): worth retrying once an operator
    has run `companion db upgrade`."""

    code = "DATABASE_SCHEMA_MISSING"
    retryable = True


# --- vector store -----------------------------------------------------------------------------------------------


class VectorStoreError(CompanionError):
    """A failure of the semantic memory store."""

    code = "VECTOR_STORE_ERROR"
    retryable = True


class VectorStoreConnectionError(VectorStoreError):
    """The vector store could not be reached."""

    code = "VECTOR_STORE_CONNECTION_ERROR"


class EmbeddingError(VectorStoreError):
    """Text could not be turned into a vector."""

    code = "VECTOR_STORE_EMBEDDING_ERROR"


# --- memory -----------------------------------------------------------------------------------------------------


class CompanionMemoryError(CompanionError):
    """A failure in the memory layer's own rules (named so it does not shadow the builtin MemoryError)."""

    code = "MEMORY_ERROR"


class UserNotFoundError(CompanionMemoryError):
    """No user with that id is known."""

    code = "MEMORY_USER_NOT_FOUND"


class InvalidMemoryDataError(CompanionMemoryError):
    """Memory data that breaks the memory rules (unknown category, empty value, ...)."""

    code = "MEMORY_INVALID_DATA"


# --- external services ------------------------------------------------------------------------------------------


class ExternalServiceError(CompanionError):
    """A remote service failed."""

    code = "EXTERNAL_SERVICE_ERROR"
    retryable = True


class OpenAIServiceError(ExternalServiceError):
    """The OpenAI-compatible LLM endpoint failed."""

    code = "EXTERNAL_OPENAI_ERROR"


class TelegramServiceError(ExternalServiceError):
    """The Telegram Bot API failed."""

    code = "EXTERNAL_TELEGRAM_ERROR"


class DeliveryInProgressError(TelegramServiceError):
    """Another attempt is sending this message to Telegram right now: try again once it is done."""

    code = "EXTERNAL_TELEGRAM_DELIVERY_IN_PROGRESS"


class TelegramBlockedError(TelegramServiceError):
    """The user blocked the bot (or left the chat): nothing can reach them until they write again."""

    code = "EXTERNAL_TELEGRAM_BLOCKED"
    retryable = False


# --- validation -------------------------------------------------------------------------------------------------


class CompanionValidationError(CompanionError):
    """Input or configuration that is not acceptable; retrying the same thing cannot help."""

    code = "VALIDATION_ERROR"


class InvalidInputError(CompanionValidationError):
    """Input from a user or operator that is refused."""

    code = "VALIDATION_INVALID_INPUT"


class InvalidArgumentError(InvalidInputError):
    """A command-line argument that is refused: the command did nothing (exit status 2, as for a usage error)."""

    code = "VALIDATION_INVALID_ARGUMENT"


class UnknownTimezoneError(InvalidInputError):
    """What a user or operator typed names no time zone (core.zones)."""

    code = "VALIDATION_UNKNOWN_TIMEZONE"


class ConfigurationError(CompanionValidationError):
    """A setting is missing or has a bad value."""

    code = "VALIDATION_CONFIGURATION"


class EmbedderChangedError(ConfigurationError):
    """The stored memories were embedded by another embedder than the configured one, in another dimension: they must
    be embedded again (`companion memory reindex`), or the embedder set back."""

    code = "VALIDATION_EMBEDDER_CHANGED"
