"""CompanionWorkflow: one long-running workflow per user, id companion-user-<telegram id>.

Signal and update handlers only accept messages (deduplicated by message key) into a queue; the run loop answers
them in order. The state is small and bounded; the conversation's text lives in PostgreSQL.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.turn import DB_RETRY, DB_TIMEOUT, LLM_RETRY, LLM_TIMEOUT, TurnActivities
    from schemas.memory import Role
    from schemas.turn import (
        REPLIES_KEPT,
        SEEN_KEYS_KEPT,
        TRANSCRIPT_LINE_CHARS,
        TRANSCRIPT_LINES_KEPT,
        CompanionState,
        ComposeReplyInput,
        EnsureUserInput,
        IncomingMessage,
        RecordMessageInput,
        TurnReply,
    )

WORKFLOW_ID_PREFIX = "companion-user-"
USER_ID_ATTRIBUTE = SearchAttributeKey.for_int("CompanionUserId")
MAX_QUEUED = 100

FALLBACK_REPLY = ("I'm sorry, I can't think straight right now: my language model isn't answering. I've kept your "
                  "message and I'll remember it. Could you try me again in a little while?")
FAILED_REPLY = "I'm sorry, something went wrong on my side and I couldn't take in that message. Please send it again."


def workflow_id(telegram_id: int) -> str:
    """The id of a user's workflow."""
    return f"{WORKFLOW_ID_PREFIX}{telegram_id}"


@workflow.defn(name="CompanionWorkflow")
class CompanionWorkflow:
    """A user's conversation with the companion."""

    @workflow.init
    def __init__(self, state: CompanionState) -> None:
        self._state = state

    @workflow.run
    async def run(self, state: CompanionState) -> None:
        """Answer queued messages in order; between turns of a long run, continue as new carrying the queue."""
        while True:
            await workflow.wait_condition(lambda: bool(self._state.queue) or self._may_continue_as_new())
            if self._may_continue_as_new():
                workflow.continue_as_new(self._state.model_copy(update={"turns_this_run": 0}))
            await self._answer(self._state.queue[0])
            self._state.queue.pop(0)

    @workflow.signal(name="message")
    def message(self, message: IncomingMessage) -> None:
        """A message to answer; its reply is delivered on its channel."""
        if message.user.telegram_id != self._state.telegram_id:
            workflow.logger.error("message for another user dropped", extra={"message_key": message.message_key})
            return
        if len(self._state.queue) >= MAX_QUEUED:
            workflow.logger.warning("queue full, message dropped", extra={"message_key": message.message_key})
            return
        self._accept(message)

    @workflow.update(name="send")
    async def send(self, message: IncomingMessage) -> TurnReply:
        """A message whose reply the caller waits for (the terminal chat)."""
        self._accept(message)
        key = message.message_key
        await workflow.wait_condition(lambda: self._reply(key) is not None or not self._is_queued(key))
        reply = self._reply(key)
        if reply is None:
            raise ApplicationError(f"message {key} was answered earlier; its reply is in the history",
                                   type="AlreadyAnswered", non_retryable=True)
        return reply

    @send.validator
    def _validate_send(self, message: IncomingMessage) -> None:
        if message.user.telegram_id != self._state.telegram_id:
            raise ValueError(f"this workflow belongs to user {self._state.telegram_id}")
        if len(self._state.queue) >= MAX_QUEUED and not self._is_queued(message.message_key):
            raise ValueError("too many messages are waiting; try again shortly")

    @workflow.query(name="state")
    def state(self) -> CompanionState:
        """The workflow's state: queue, counters, recent replies and transcript."""
        return self._state

    # --- the turn -----------------------------------------------------------------------------------------------

    def _accept(self, message: IncomingMessage) -> None:
        if message.message_key in self._state.seen_keys:
            return  # a redelivered message: answered or queued already
        self._state.seen_keys = [*self._state.seen_keys, message.message_key][-SEEN_KEYS_KEPT:]
        self._state.queue.append(message)

    async def _answer(self, message: IncomingMessage) -> None:
        try:
            reply = await self._turn(message)
        except ActivityError as err:
            # Only a non-retryable storage failure gets here; the workflow must outlive one bad message.
            workflow.logger.error("turn failed", extra={"message_key": message.message_key, "error": str(err.cause)})
            reply = TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=FAILED_REPLY,
                              fallback=True)
        self._state.replies = [*self._state.replies, reply][-REPLIES_KEPT:]

    async def _turn(self, message: IncomingMessage) -> TurnReply:
        user_id = await self._user_id(message)
        await self._record(user_id, message.message_key, Role.USER, message.text, message)
        text, fallback = await self._compose(user_id, message)
        self._after_turn(message, text, fallback)
        return TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=text, fallback=fallback)

    async def _user_id(self, message: IncomingMessage) -> int:
        if self._state.user_id is None:
            ref = await workflow.execute_local_activity_method(
                TurnActivities.ensure_user, EnsureUserInput(user=message.user),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
            self._state.user_id, self._state.display_name = ref.user_id, ref.display_name
            workflow.upsert_memo({"user_name": ref.display_name, "telegram_id": self._state.telegram_id})
        return self._state.user_id

    async def _record(self, user_id: int, key: str, role: Role, text: str, message: IncomingMessage,
                      fallback: bool = False) -> None:
        sent_at = message.sent_at if role == Role.USER else workflow.now()
        await workflow.execute_local_activity_method(
            TurnActivities.record_message,
            RecordMessageInput(user_id=user_id, message_key=key, role=role, text=text, channel=message.channel,
                               sent_at=sent_at, fallback=fallback),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)

    async def _compose(self, user_id: int, message: IncomingMessage) -> tuple[str, bool]:
        try:
            reply = await workflow.execute_activity_method(
                TurnActivities.compose_reply,
                ComposeReplyInput(user_id=user_id, message_key=message.message_key, reply_key=message.reply_key,
                                  text=message.text, channel=message.channel),
                start_to_close_timeout=LLM_TIMEOUT, retry_policy=LLM_RETRY, summary="LLM reply")
        except ActivityError as err:
            workflow.logger.warning("LLM failed, sending the fallback reply",
                                    extra={"message_key": message.message_key, "error": str(err.cause)})
            self._state.fallbacks += 1
            await self._record(user_id, message.reply_key, Role.ASSISTANT, FALLBACK_REPLY, message, fallback=True)
            return FALLBACK_REPLY, True
        return reply.text, False

    def _after_turn(self, message: IncomingMessage, reply: str, fallback: bool) -> None:
        self._state.turns += 1
        self._state.turns_this_run += 1
        self._state.last_turn_at = workflow.now()
        name = self._state.display_name or "user"
        lines = [f"**{name}**: {_clip(message.text)}", f"**companion**{' (fallback)' if fallback else ''}: "
                 f"{_clip(reply)}"]
        self._state.transcript = [*self._state.transcript, *lines][-TRANSCRIPT_LINES_KEPT:]
        workflow.set_current_details("\n\n".join(self._state.transcript))

    def _may_continue_as_new(self) -> bool:
        # A waiting update (the terminal chat) must get its reply from this run, so wait for handlers to finish.
        long_run = (self._state.turns_this_run >= self._state.turns_per_run
                    or workflow.info().is_continue_as_new_suggested())
        return long_run and workflow.all_handlers_finished()

    def _reply(self, key: str) -> TurnReply | None:
        return next((reply for reply in self._state.replies if reply.message_key == key), None)

    def _is_queued(self, key: str) -> bool:
        return any(queued.message_key == key for queued in self._state.queue)


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TRANSCRIPT_LINE_CHARS else flat[:TRANSCRIPT_LINE_CHARS - 1] + "…"

