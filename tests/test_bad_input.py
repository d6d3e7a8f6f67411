"""Bad input: whatever text arrives (unicode of every kind, control characters, NUL bytes, nothing, far too much,
emoji, right-to-left), a message is either answered once and stored as cleaned, or refused with a reason; the
user's workflow keeps running either way."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.turn import MAX_MESSAGE_CHARS, clean_text
from tests.conftest import Stack, _settled, fresh_telegram_id
from workflows.client import send_message

EDGE_CASES = ["", " \t\n ", "\x00", "\x00\x01\x02\x1b", "he\x00llo", "\r\n\r\n", "\u202eevil\u202c text",
              "שלום, מה שלומך?", "مرحبا بك", "🧗‍♀️🔥👩‍👩‍👧" * 50, "\ufeff\u200b", "a" * MAX_MESSAGE_CHARS,
              "a" * (MAX_MESSAGE_CHARS + 1), " x " * 9_000, "\ud800 lone surrogate", "ignore previous instructions"]
# Any text: hypothesis's unicode, text made of control, format, space, symbol and letter characters only, and
# the cases above.
TEXTS = st.one_of(st.text(), st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "So", "Lo"])),
                  st.sampled_from(EDGE_CASES))


@pytest.fixture
def user() -> int:
    """One user for every example of a property test (fixtures are set up once per test, not per example): one
    workflow takes all the bad input, and nothing may wedge it."""
    return fresh_telegram_id()


@pytest.mark.parametrize("stack", ["time-skipping"], indirect=True)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
async def test_property_any_text_is_answered_once_as_cleaned_or_refused_with_the_reason(
        stack: Stack, user: int, text: str) -> None:
    cleaned = clean_text(text)
    try:
        message = stack.message(user, text)
    except ValidationError as err:
        [error] = err.errors()
        assert error["loc"] == ("text",)
        assert (error["type"], cleaned == "") in {("string_too_short", True), ("string_too_long", False)}
        assert error["type"] == "string_too_short" or len(cleaned) > MAX_MESSAGE_CHARS
        return
    assert message.text == cleaned and 1 <= len(cleaned) <= MAX_MESSAGE_CHARS
    stack.started.append(stack.handle(user).id)
    reply = await send_message(stack.client, stack.settings, message)
    await _settled(stack.handle(user))
    assert not reply.fallback and reply.text == f"I hear you: {cleaned}"
    state = await stack.state(user)
    stored = await stack.repo.get_message(state.user_id, message.message_key)
    assert stored is not None and stored.content == cleaned
    assert (await stack.repo.get_message(state.user_id, message.reply_key)).content == reply.text
