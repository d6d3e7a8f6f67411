"""The error hierarchy: typed, coded, serialisable."""

from __future__ import annotations

import json

import pytest

from core import errors


def _all_error_classes() -> list[type[errors.CompanionError]]:
    found, stack = [], [errors.CompanionError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def test_every_error_has_its_own_code() -> None:
    codes = [cls.code for cls in _all_error_classes()]
    assert len(codes) == len(set(codes)) >= 18


@pytest.mark.parametrize(
    ("cls", "family"),
    [
        (errors.RecordNotFoundError, errors.DatabaseError),
        (errors.DuplicateRecordError, errors.ConstraintViolationError),
        (errors.DatabaseConnectionError, errors.DatabaseError),
        (errors.VectorStoreConnectionError, errors.VectorStoreError),
        (errors.EmbeddingError, errors.VectorStoreError),
        (errors.UserNotFoundError, errors.CompanionMemoryError),
        (errors.InvalidMemoryDataError, errors.CompanionMemoryError),
        (errors.OpenAIServiceError, errors.ExternalServiceError),
        (errors.TelegramServiceError, errors.ExternalServiceError),
        (errors.InvalidInputError, errors.CompanionValidationError),
        (errors.ConfigurationError, errors.CompanionValidationError),
    ],
)
def test_errors_belong_to_their_family(cls: type, family: type) -> None:
    assert issubclass(cls, family)
    assert issubclass(cls, errors.CompanionError)


def test_to_dict_is_json_with_code_context_and_cause() -> None:
    try:
        try:
            raise ConnectionResetError("peer went away")
        except ConnectionResetError as cause:
            raise errors.DatabaseConnectionError("add_message failed", context={"user_id": 7, "keys": ("a", "b"),
                                                                               "at": object()}, cause=cause)
    except errors.CompanionError as exc:
        data = json.loads(json.dumps(exc.to_dict()))
    assert data["type"] == "DatabaseConnectionError"
    assert data["code"] == "DATABASE_CONNECTION_ERROR"
    assert data["message"] == "add_message failed"
    assert data["retryable"] is True
    assert data["context"]["user_id"] == 7
    assert data["context"]["keys"] == ["a", "b"]
    assert data["cause"] == "ConnectionResetError"


def test_validation_errors_are_not_retryable() -> None:
    assert not errors.InvalidInputError("bad").retryable
    assert not errors.DuplicateRecordError("dup").retryable
    assert errors.OpenAIServiceError("down").retryable
