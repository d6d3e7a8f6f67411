"""CompanionWorkflow: one long-running workflow per user, id companion-user-<telegram id>.

Signal and update handlers only accept messages (deduplicated by message key) into a queue; the run loop answers
them in order. The state is small and bounded; the conversation's text lives in PostgreSQL.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.delivery import TELEGRAM_RETRY
    from activities.nudges import CompanionActivities, nudge_message_key
    from activities.sending import TELEGRAM_TIMEOUT
    from activities.turn import (
        DB_RETRY,
        DB_TIMEOUT,
        LLM_HEARTBEAT,
        LLM_RETRY,
        LLM_TIMEOUT,
        REMEMBER_RETRY,
        REMEMBER_TIMEOUT,
    )
    from core.errors import CompanionMemoryError, DatabaseError, TelegramBlockedError
    from schemas.memory import Channel, NudgeCreator, NudgeKind, NudgeStatus, Role
    from schemas.turn import (
        MAX_PENDING_NUDGES,
        REMEMBER_BATCH_TURNS,
        REPLIES_KEPT,
        SEEN_KEYS_KEPT,
        TRANSCRIPT_LINE_CHARS,
        TRANSCRIPT_LINES_KEPT,
        CompanionState,
        ComposedReply,
        ComposeReplyInput,
        ChatUser,
        DeliverInput,
        EnsureUserInput,
        FireNudgeInput,
        ForgetInput,
        Forgotten,
        IncomingMessage,
        Nudge,
        PlanCheckinInput,
        RecordMessageInput,
        RecordNudgeInput,
        RememberInput,
        SetNudgeStatusInput,
        SetUserActiveInput,
        TurnReply,
        reply_key_of,
    )

WORKFLOW_ID_PREFIX = "companion-user-"
USER_ID_ATTRIBUTE = SearchAttributeKey.for_int("CompanionUserId")
MAX_QUEUED = 100
DONE_NUDGES_KEPT = 100

FALLBACK_REPLY = ("I'm sorry, I can't think straight right now: my language model isn't answering. I've kept your "
                  "message and I'll remember it. Could you try me again in a little while?")
FAILED_REPLY = "I'm sorry, something went wrong on my side and I couldn't take in that message. Please send it again."
# Patch ids (workflow.patched): histories recorded before a change replay without it.
TELEGRAM_DELIVERY = "telegram-delivery"
OWN_NUDGES = "own-nudges"  # reminders users ask for, follow-ups on events they mention, check-ins after silence
REMEMBER = "remember-step"  # after each turn: index its messages, extract facts, events, milestones, reminders
# One remember step at a time: turns answered while one runs are remembered together by the next. Each step starts
# from the summary the last one left, and a burst of messages costs one embeddings call and one extraction.
REMEMBER_ONE_AT_A_TIME = "remember-one-at-a-time"
# The remember step waits until the user has been quiet for remember_after_quiet_s (or REMEMBER_BATCH_TURNS turns
# wait), so a conversation in full flow is remembered in a few steps rather than one per turn.
REMEMBER_WHEN_QUIET = "remember-when-quiet"
# Delivery to Telegram runs as a local activity, in the workflow task that asks for it: one activity task and one
# workflow task fewer a turn. Its attempts are markers in the history; a failed one is retried by the worker.
DELIVER_LOCALLY = "deliver-locally"
# The reply step runs as a local activity too: with the storage steps and the delivery, a turn is one workflow task
# and no activity task. A worker lost mid-step is replaced when that workflow task times out (10 s), as a heartbeat
# timeout did; the step runs again there and finds the reply if the lost worker had stored it.
REPLY_LOCALLY = "reply-locally"
# Every patch above is settled as a run begins, in its first workflow task: a run that took patches-at-start there
# has all of them (they are older), with one marker and one search attribute update instead of one of each per patch.
# Asked for later, after a local activity, a patch could be answered wrongly by a replay: a query that reaches the
# worker with a workflow task can end that task between a local activity's result and the code that follows it, and
# a replay then runs that code a task early, before it has seen the patch markers the next task recorded
# (tests/histories/query_mid_turn.json holds a turn cut so). A run's first task begins the same way in a replay as it
# did live. A new patch is asked for beside this one, at the start of `run`; its change reaches a conversation
# already running at its next run.
PATCHES_AT_START = "patches-at-start"
# The loop's timer is kept while the next wake only moves later (the pause before a remember step does, at every
# turn): woken early, the loop sets it again. Before, each turn cancelled the timer and started another, two events
# and two commands a turn. Asked for at the start of `run`, beside patches-at-start.
KEEP_LOOP_TIMER = "keep-loop-timer"
# The reply step stores the user's message before it gathers the prompt: one local activity a turn fewer. A reply
# step that fails stores the message in a step of its own first, which is retried until PostgreSQL is back (or ends
# the turn for a message that cannot be stored, as before); after a failure of PostgreSQL's the reply step runs
# again, after the LLM's the user gets the fallback reply. Asked for at the start of `run`, beside patches-at-start.
RECORD_IN_REPLY = "record-in-reply"
# The reply step sends the reply to Telegram too, right after storing it (stored claimed, as the deliver step would
# claim it): a Telegram turn is one local activity. When sending fails there, the reply step reports it and the
# deliver step sends the reply after the turn's nudges are scheduled, as before, waiting out the flood control
# Telegram asked for; a user who blocked the bot is marked out of reach without asking Telegram again. Asked for at
# the start of `run`, beside patches-at-start.
DELIVER_IN_REPLY = "deliver-in-reply"


def _type_names(base: type) -> frozenset[str]:
    """The names of ``base`` and of every class below it: the ApplicationError types its failures arrive as."""
    return frozenset({base.__name__}).union(*(_type_names(sub) for sub in base.__subclasses__()))


# Failures of a reply step that are PostgreSQL's or the stored data's, not the LLM's (ApplicationError types).
STORAGE_FAILURES = _type_names(DatabaseError) | _type_names(CompanionMemoryError)
# The failure of a send to a user who blocked the bot (ApplicationError type, and ComposedReply.undelivered).
BLOCKED = TelegramBlockedError.__name__
# What a failed step raises in the workflow: ActivityError for a regular activity; a local activity's failure
# arrives as the ApplicationError it raised. Either must end a turn, not the workflow.
FAILED_STEP = (ActivityError, ApplicationError)
CHECKIN_SLACK = timedelta(hours=1)
CHECKIN_PURPOSE = ("check in with the user, who has not written for a few days: ask how they are, picking up "
                   "something they told you")
BLOCKED_REASON = "the user blocked the bot"


def workflow_id(telegram_id: int) -> str:
    """The id of a user's workflow."""
    return f"{WORKFLOW_ID_PREFIX}{telegram_id}"


@workflow.defn(name="CompanionWorkflow")
class CompanionWorkflow:
    """A user's conversation with the companion."""

    @workflow.init
    def __init__(self, state: CompanionState) -> None:
        self._state = state
        self._nudges_changed = False
        self._fresh_run = False  # set by /forget: continue as new so the erased turns leave the open history
        # A turn, a firing nudge and /forget each touch the user's rows; one at a time.
        self._lock = asyncio.Lock()
        # Remember steps in flight: they run beside the next turn, and /forget or continue-as-new wait for them.
        self._remembering = 0
        # Turns answered while a remember step ran (message keys, oldest first): the next step takes them all.
        self._unremembered: list[str] = []
        # Set once a turn took the remember-when-quiet path: from then on the loop's timer also counts the silence
        # after the last turn, and a finished remember step wakes the loop to set it anew.
        self._when_quiet = False
        self._remember_changed = False
        self._patched_at_start = False  # set as the run begins
        self._keep_timer = False  # set as the run begins: keep-loop-timer
        self._alarm: asyncio.Task[None] | None = None  # the loop's timer (keep-loop-timer), and when it rings
        self._alarm_at: datetime | None = None
        self._alarm_rang = False
        self._records_in_reply = False  # set as the run begins: record-in-reply
        self._delivers_in_reply = False  # set as the run begins: deliver-in-reply

    @workflow.run
    async def run(self, state: CompanionState) -> None:
        """Answer queued messages in order and fire nudges when due; continue as new between turns of a long run."""
        self._patched_at_start = workflow.patched(PATCHES_AT_START)
        self._keep_timer = workflow.patched(KEEP_LOOP_TIMER)
        self._records_in_reply = workflow.patched(RECORD_IN_REPLY)
        self._delivers_in_reply = workflow.patched(DELIVER_IN_REPLY)
        while True:
            self._nudges_changed = self._remember_changed = False
            # The timer runs to the next nudge (or to the end of the pause the remember step waits for); a new or
            # cancelled nudge, or a remember step ending, wakes the loop to set it anew.
            if self._keep_timer:
                self._set_alarm(self._until_next_wake())
                await workflow.wait_condition(lambda: self._awake() or self._alarm_rang)
                self._alarm_rang = False
            else:
                try:
                    await workflow.wait_condition(self._awake, timeout=self._until_next_wake())
                except TimeoutError:
                    pass
            if self._remember_due():
                self._start_remembering(self._state.user_id, self._take_unremembered())
            while self._may_continue_as_new() and (self._remembering or self._waiting_to_remember()):
                # The remember steps bring the summary the next run carries: the turns waiting for one are
                # remembered now (after the step in flight), and the steps land before the run ends.
                if self._waiting_to_remember():
                    self._start_remembering(self._state.user_id, self._take_unremembered())
                await workflow.wait_condition(lambda: self._remembering == 0)
            if self._may_continue_as_new():  # again: an update may have come in meanwhile
                workflow.continue_as_new(self._state.model_copy(update={"turns_this_run": 0}))
            async with self._lock:
                if self._state.queue:
                    await self._answer(self._state.queue[0])
                    self._state.queue.pop(0)
                elif (nudge := self._due_nudge()) is not None:
                    await self._fire(nudge)

    @workflow.signal(name="message")
    def message(self, message: IncomingMessage) -> None:
        """A message to answer; its reply is delivered on its channel."""
        refusal = self._refusal(message)
        if refusal is not None:  # a signal cannot be refused to its sender: log and drop
            workflow.logger.warning("message dropped", extra={"message_key": message.message_key,
                                                              "reason": refusal})
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
        refusal = self._refusal(message)
        if refusal is not None:
            raise ValueError(refusal)

    def _refusal(self, message: IncomingMessage) -> str | None:
        """Why a message cannot be accepted, or None."""
        if message.user.telegram_id != self._state.telegram_id:
            return f"this workflow belongs to user {self._state.telegram_id}"
        if len(self._state.queue) >= MAX_QUEUED and not self._is_queued(message.message_key):
            return "too many messages are waiting; try again shortly"
        return None

    @workflow.query(name="state")
    def state(self) -> CompanionState:
        """The workflow's state: queue, counters, recent replies and transcript."""
        return self._state

    @workflow.update(name="schedule_nudge")
    async def schedule_nudge(self, nudge: Nudge) -> Nudge:
        """Schedule a proactive message; its audit record is written before the timer counts."""
        user_id = await self._ensure_user(ChatUser(telegram_id=self._state.telegram_id))
        await workflow.execute_local_activity_method(
            CompanionActivities.record_nudge, RecordNudgeInput(user_id=user_id, nudge=nudge),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
        self._add_nudge(nudge)
        return nudge

    @schedule_nudge.validator
    def _validate_schedule(self, nudge: Nudge) -> None:
        if nudge.at <= workflow.now():
            raise ValueError(f"the time {nudge.at.isoformat()} is in the past")
        if nudge.text is None and nudge.purpose is None:
            raise ValueError("a nudge needs its text or a purpose")
        if self._pending(nudge.nudge_id) or nudge.nudge_id in self._state.done_nudges:
            raise ValueError(f"nudge {nudge.nudge_id} exists already")
        if len(self._state.nudges) >= MAX_PENDING_NUDGES:
            raise ValueError(f"this user has {MAX_PENDING_NUDGES} pending nudges; cancel some first")
        if self._state.blocked:
            raise ValueError("this user has blocked the bot; nothing can reach them until they write again")

    @workflow.update(name="cancel_nudge")
    async def cancel_nudge(self, nudge_id: str) -> Nudge:
        """Cancel a pending nudge: its timer stops counting and its record says cancelled."""
        nudge = self._pending(nudge_id)
        assert nudge is not None  # the validator saw it pending, and nothing ran in between
        self._drop_nudge(nudge_id)
        _count_nudges("cancelled")
        await workflow.execute_local_activity_method(
            CompanionActivities.set_nudge_status, SetNudgeStatusInput(nudge_id=nudge_id, status=NudgeStatus.CANCELLED),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
        return nudge

    @cancel_nudge.validator
    def _validate_cancel(self, nudge_id: str) -> None:
        if nudge_id in self._state.done_nudges:
            raise ValueError(f"nudge {nudge_id} is not pending any more: it was sent or cancelled already")
        if self._pending(nudge_id) is None:
            raise ValueError(f"this user has no nudge {nudge_id}")

    @workflow.query(name="nudges")
    def nudges(self) -> list[Nudge]:
        """The pending nudges, soonest first."""
        return self._state.nudges

    @workflow.update(name="set_checkins")
    async def set_checkins(self, enabled: bool) -> list[Nudge]:
        """Turn the companion's check-ins on or off (/quiet); turning them off cancels pending ones."""
        self._state.checkins = enabled
        cancelled = [nudge for nudge in self._state.nudges if nudge.kind == NudgeKind.CHECK_IN] if not enabled else []
        for nudge in cancelled:
            await self.cancel_nudge(nudge.nudge_id)
        return cancelled

    @workflow.update(name="forget")
    async def forget(self) -> Forgotten:
        """Erase everything remembered of the user (/forget): their rows, pending nudges, replies and transcript."""
        async with self._lock:  # never in the middle of a turn that is writing the rows
            await workflow.wait_condition(lambda: self._remembering == 0)
            # The turns waiting for a remember step are about to be erased: the pause's timer, firing while the
            # rows go, must not start a step that would index them again.
            self._unremembered = []
            forgotten = await workflow.execute_local_activity_method(
                CompanionActivities.forget_user, ForgetInput(telegram_id=self._state.telegram_id),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
            cancelled = self._drop_all_nudges()
            self._state = self._state.model_copy(update={
                "user_id": None, "display_name": None, "replies": [], "transcript": [], "summary": "",
                "last_turn_at": None})
            self._fresh_run = True
            workflow.set_current_details("")
            workflow.upsert_memo({"user_name": None})
        return forgotten.model_copy(update={"nudges_cancelled": cancelled})

    # --- the turn -----------------------------------------------------------------------------------------------

    def _accept(self, message: IncomingMessage) -> None:
        if message.message_key in self._state.seen_keys:
            return  # a redelivered message: answered or queued already
        self._state.seen_keys = [*self._state.seen_keys, message.message_key][-SEEN_KEYS_KEPT:]
        self._state.queue.append(message)

    async def _answer(self, message: IncomingMessage) -> None:
        try:
            reply = await self._turn(message)
        except FAILED_STEP as err:
            # Only a non-retryable storage failure gets here; the workflow must outlive one bad message.
            workflow.logger.error("turn failed", extra={"message_key": message.message_key,
                                                       "error": str(_cause(err))})
            reply = TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=FAILED_REPLY,
                              fallback=True)
        self._state.replies = [*self._state.replies, reply][-REPLIES_KEPT:]
        if self._state.user_id is None or reply.text == FAILED_REPLY or not self._patched(REMEMBER):
            return
        if not self._patched(REMEMBER_ONE_AT_A_TIME):
            self._start_remembering(self._state.user_id, [message.message_key])
            return
        self._unremembered.append(message.message_key)
        if self._state.remember_after_quiet_s and self._patched(REMEMBER_WHEN_QUIET):
            self._when_quiet = True
            if self._remember_due():
                self._start_remembering(self._state.user_id, self._take_unremembered())
            return
        if not self._remembering:
            self._start_remembering(self._state.user_id, self._take_unremembered())

    def _remember_due(self) -> bool:
        """Whether the turns waiting should be remembered now: the user has been quiet long enough, or enough turns
        wait (remember-when-quiet only; otherwise they are remembered at once)."""
        if not self._waiting_to_remember():
            return False
        return len(self._unremembered) >= REMEMBER_BATCH_TURNS or self._until_quiet() == timedelta(0)

    def _waiting_to_remember(self) -> bool:
        """Turns wait for a remember step that the end of a pause would start (remember-when-quiet)."""
        return (self._when_quiet and bool(self._unremembered) and not self._remembering
                and self._state.user_id is not None)

    def _until_quiet(self) -> timedelta:
        """How long until the user has been quiet for remember_after_quiet_s since the last turn."""
        if self._state.last_turn_at is None:
            return timedelta(0)
        end = self._state.last_turn_at + timedelta(seconds=self._state.remember_after_quiet_s)
        return max(end - workflow.now(), timedelta(0))

    def _take_unremembered(self) -> list[str]:
        turns, self._unremembered = self._unremembered, []
        return turns

    def _start_remembering(self, user_id: int, turns: list[str]) -> None:
        self._remembering += 1
        asyncio.create_task(self._remember(user_id, turns))  # noqa: RUF006 (counted above)

    async def _remember(self, user_id: int, turns: list[str]) -> None:
        """The remember step of turns after their replies: memories from them, and the reminders and summary it
        found. Turns answered meanwhile are remembered by the next step, started as this one ends (remember-when-quiet:
        once the user has paused, or enough turns wait)."""
        latest = turns[-1]
        try:
            # Remembered later than it was said: "tomorrow" still means the day after the last turn.
            now = self._state.last_turn_at if self._when_quiet and self._state.last_turn_at else workflow.now()
            remembered = await workflow.execute_activity_method(
                CompanionActivities.remember,
                RememberInput(user_id=user_id, message_key=latest, reply_key=reply_key_of(latest),
                              earlier=turns[:-1], now=now, summary=self._state.summary),
                start_to_close_timeout=REMEMBER_TIMEOUT, retry_policy=REMEMBER_RETRY, summary="remember")
            if remembered.summary:
                self._state.summary = remembered.summary
            for nudge in remembered.reminders:
                if self._state.user_id == user_id:  # not forgotten meanwhile
                    await self._schedule_own(user_id, nudge)
        except ActivityError as err:
            workflow.logger.error("remember step failed", extra={"message_key": latest, "error": str(err.cause)})
        finally:
            self._remembering -= 1
            if self._when_quiet:
                self._remember_changed = True  # the loop starts the next step when it is due
            elif self._unremembered and self._state.user_id == user_id:  # not forgotten meanwhile
                self._start_remembering(user_id, self._take_unremembered())

    async def _turn(self, message: IncomingMessage) -> TurnReply:
        self._state.channel, self._state.chat_id = message.channel, message.chat_id
        user_id = await self._ensure_user(message.user)
        if self._state.blocked:  # they wrote again, so they can be reached again
            await self._set_active(user_id, True)
        if not self._records_in_reply:
            await self._record(user_id, message.message_key, Role.USER, message.text, message)
        # A run that sends in the reply step took patches-at-start, and with it telegram-delivery.
        reply, fallback = await self._compose(user_id, message, record=self._records_in_reply,
                                              deliver=self._delivers_in_reply and message.channel == Channel.TELEGRAM)
        self._after_turn(message, reply.text, fallback)
        if self._patched(OWN_NUDGES):
            for nudge in (reply.reminder, reply.follow_up):
                if nudge is not None:
                    await self._schedule_own(user_id, nudge)
            await self._plan_checkin(user_id)
        if message.channel == Channel.TELEGRAM and self._patched(TELEGRAM_DELIVERY) and not reply.delivered:
            await self._deliver_unsent(user_id, message.chat_id, message.reply_key, reply)
        return TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=reply.text,
                         fallback=fallback)

    async def _deliver_unsent(self, user_id: int, chat_id: int, message_key: str, reply: ComposedReply) -> None:
        """Deliver a reply the reply step did not send: it was not asked to (the fallback reply, an older run), or
        sending failed there (deliver-in-reply)."""
        if reply.undelivered == BLOCKED:
            await self._set_active(user_id, False)  # as the deliver step would, without asking Telegram again
            return
        if reply.deliver_after_s:
            await workflow.sleep(timedelta(seconds=reply.deliver_after_s))  # the flood control Telegram asked for
        await self._deliver(user_id, chat_id, message_key)

    async def _deliver(self, user_id: int, chat_id: int, message_key: str) -> None:
        data = DeliverInput(user_id=user_id, chat_id=chat_id, message_key=message_key)
        execute = (workflow.execute_local_activity_method if self._patched(DELIVER_LOCALLY)
                   else workflow.execute_activity_method)
        try:
            await execute(CompanionActivities.deliver, data, start_to_close_timeout=TELEGRAM_TIMEOUT,
                          retry_policy=TELEGRAM_RETRY, summary="Telegram delivery")
        except FAILED_STEP as err:
            cause = _cause(err)
            if isinstance(cause, ApplicationError) and cause.type == BLOCKED:
                await self._set_active(user_id, False)
                return
            workflow.logger.error("delivery failed", extra={"message_key": message_key, "error": str(cause)})
            self._state.undelivered += 1

    async def _set_active(self, user_id: int, active: bool) -> None:
        """Note that the user can (again) or cannot be reached; out of reach, their pending nudges are cancelled."""
        self._state.blocked = not active
        if not active:
            self._drop_all_nudges()
        await workflow.execute_local_activity_method(
            CompanionActivities.set_user_active,
            SetUserActiveInput(user_id=user_id, active=active, reason=None if active else BLOCKED_REASON),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)

    async def _ensure_user(self, user: ChatUser) -> int:
        if self._state.user_id is None:
            ref = await workflow.execute_local_activity_method(
                CompanionActivities.ensure_user, EnsureUserInput(user=user),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
            self._state.user_id, self._state.display_name = ref.user_id, ref.display_name
            self._state.timezone = ref.timezone
            workflow.upsert_memo({"user_name": ref.display_name, "telegram_id": self._state.telegram_id})
        return self._state.user_id

    async def _record(self, user_id: int, key: str, role: Role, text: str, message: IncomingMessage,
                      fallback: bool = False) -> None:
        sent_at = message.sent_at if role == Role.USER else workflow.now()
        await workflow.execute_local_activity_method(
            CompanionActivities.record_message,
            RecordMessageInput(user_id=user_id, message_key=key, role=role, text=text, channel=message.channel,
                               sent_at=sent_at, fallback=fallback),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)

    async def _compose(self, user_id: int, message: IncomingMessage, record: bool = False,
                       deliver: bool = False) -> tuple[ComposedReply, bool]:
        """The reply (with the nudges the message gave rise to) and whether it is the fallback. With ``record`` the
        reply step stores the user's message too (record-in-reply), with ``deliver`` it sends the reply to Telegram
        (deliver-in-reply); the fallback reply is not sent."""
        data = ComposeReplyInput(user_id=user_id, message_key=message.message_key, reply_key=message.reply_key,
                                 text=message.text, channel=message.channel, chat_id=message.chat_id,
                                 now=workflow.now(), summary=self._state.summary,
                                 record_sent_at=message.sent_at if record else None, deliver=deliver)
        try:
            if self._patched(REPLY_LOCALLY):
                reply = await workflow.execute_local_activity_method(
                    CompanionActivities.compose_reply, data, start_to_close_timeout=LLM_TIMEOUT,
                    retry_policy=LLM_RETRY, summary="LLM reply")
            else:
                reply = await workflow.execute_activity_method(
                    CompanionActivities.compose_reply, data, start_to_close_timeout=LLM_TIMEOUT,
                    heartbeat_timeout=LLM_HEARTBEAT, retry_policy=LLM_RETRY, summary="LLM reply")
        except FAILED_STEP as err:
            if record:
                # The message is kept whatever failed: its own step waits for PostgreSQL (or ends the turn).
                await self._record(user_id, message.message_key, Role.USER, message.text, message)
                cause = _cause(err)
                if isinstance(cause, ApplicationError) and cause.type in STORAGE_FAILURES:
                    return await self._compose(user_id, message, deliver=deliver)
            workflow.logger.warning("LLM failed, sending the fallback reply",
                                    extra={"message_key": message.message_key, "error": str(_cause(err))})
            self._state.fallbacks += 1
            await self._record(user_id, message.reply_key, Role.ASSISTANT, FALLBACK_REPLY, message, fallback=True)
            return ComposedReply(text=FALLBACK_REPLY), True
        return reply, False

    async def _schedule_own(self, user_id: int, nudge: Nudge) -> None:
        """Schedule a nudge the companion decided on (a reminder asked for), unless the rules refuse it."""
        try:
            self._validate_schedule(nudge)
        except ValueError as err:
            workflow.logger.warning("nudge not scheduled", extra={"nudge_id": nudge.nudge_id, "reason": str(err)})
            return
        await workflow.execute_local_activity_method(
            CompanionActivities.record_nudge, RecordNudgeInput(user_id=user_id, nudge=nudge),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
        self._add_nudge(nudge)

    async def _plan_checkin(self, user_id: int) -> None:
        """Move the check-in to N days after this message: any message from the user resets the silence."""
        days = self._state.checkin_after_days
        if not self._state.checkins or self._state.blocked or days <= 0:
            return
        old = next((nudge for nudge in self._state.nudges if nudge.kind == NudgeKind.CHECK_IN), None)
        at = workflow.now() + timedelta(days=days)
        if old is not None and at - old.at < CHECKIN_SLACK:
            return  # a chat in full flow moves its check-in once an hour, not at every message
        if old is None and len(self._state.nudges) >= MAX_PENDING_NUDGES:
            return
        nudge = Nudge(nudge_id=f"checkin-{workflow.uuid4().hex[:16]}", at=at,
                      purpose=CHECKIN_PURPOSE, kind=NudgeKind.CHECK_IN, created_by=NudgeCreator.COMPANION)
        await workflow.execute_local_activity_method(
            CompanionActivities.plan_checkin,
            PlanCheckinInput(user_id=user_id, replaces=old.nudge_id if old else None, nudge=nudge),
            start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
        if old is not None:
            self._drop_nudge(old.nudge_id)
            _count_nudges("replaced")
        self._add_nudge(nudge)

    def _after_turn(self, message: IncomingMessage, reply: str, fallback: bool) -> None:
        _count("companion_turns", "conversation turns answered", channel=message.channel.value)
        if fallback:
            _count("companion_fallback_replies", "turns answered with the fallback reply")
        self._state.turns += 1
        self._state.turns_this_run += 1
        self._state.last_turn_at = workflow.now()
        name = self._state.display_name or "user"
        self._add_transcript([f"**{name}**: {_clip(message.text)}",
                              f"**companion**{' (fallback)' if fallback else ''}: {_clip(reply)}"])

    def _add_transcript(self, lines: list[str]) -> None:
        self._state.transcript = [*self._state.transcript, *lines][-TRANSCRIPT_LINES_KEPT:]
        workflow.set_current_details("\n\n".join(self._state.transcript))

    async def _fire(self, nudge: Nudge) -> None:
        # Out of the pending list first: from here on a cancel is refused rather than racing the delivery.
        self._drop_nudge(nudge.nudge_id)
        user_id = await self._ensure_user(ChatUser(telegram_id=self._state.telegram_id))
        try:
            fired = await workflow.execute_activity_method(
                CompanionActivities.fire_nudge,
                FireNudgeInput(user_id=user_id, nudge=nudge, channel=self._state.channel, now=workflow.now()),
                start_to_close_timeout=LLM_TIMEOUT, retry_policy=LLM_RETRY, summary=f"nudge {nudge.nudge_id}")
        except ActivityError as err:
            workflow.logger.warning("nudge failed", extra={"nudge_id": nudge.nudge_id, "error": str(err.cause)})
            _count_nudges("failed")
            await workflow.execute_local_activity_method(
                CompanionActivities.set_nudge_status,
                SetNudgeStatusInput(nudge_id=nudge.nudge_id, status=NudgeStatus.FAILED, error=str(err.cause)),
                start_to_close_timeout=DB_TIMEOUT, retry_policy=DB_RETRY)
            return
        if fired.postponed_until is not None:  # the user's quiet hours: pending again, until they end
            self._state.done_nudges.remove(nudge.nudge_id)
            self._add_nudge(nudge.model_copy(update={"at": fired.postponed_until}))
            _count_nudges("postponed")
            return
        _count_nudges("sent")
        self._add_transcript([f"**companion** (nudge): {_clip(fired.text)}"])
        if self._state.channel == Channel.TELEGRAM and self._patched(TELEGRAM_DELIVERY):
            # A nudge is personal: to the user's private chat (its id is theirs), never the group they wrote in last.
            await self._deliver(user_id, self._state.telegram_id, nudge_message_key(nudge.nudge_id))

    def _add_nudge(self, nudge: Nudge) -> None:
        self._state.nudges = sorted([*self._state.nudges, nudge], key=lambda pending: pending.at)
        self._nudges_changed = True

    def _pending(self, nudge_id: str) -> Nudge | None:
        return next((nudge for nudge in self._state.nudges if nudge.nudge_id == nudge_id), None)

    def _drop_nudge(self, nudge_id: str) -> None:
        """Out of the pending list and into the done ones (sent, cancelled or failed: never again)."""
        self._state.nudges = [pending for pending in self._state.nudges if pending.nudge_id != nudge_id]
        self._state.done_nudges = [*self._state.done_nudges, nudge_id][-DONE_NUDGES_KEPT:]

    def _drop_all_nudges(self) -> int:
        """Drop every pending nudge (the user is out of reach, or forgotten) and wake the loop; returns how many."""
        dropped = [nudge.nudge_id for nudge in self._state.nudges]
        for nudge_id in dropped:
            self._drop_nudge(nudge_id)
        _count_nudges("cancelled", len(dropped))
        self._nudges_changed = True
        return len(dropped)

    def _due_nudge(self) -> Nudge | None:
        due = [nudge for nudge in self._state.nudges if nudge.at <= workflow.now()]
        return due[0] if due else None

    def _until_next_nudge(self) -> timedelta | None:
        if not self._state.nudges:
            return None
        return max(self._state.nudges[0].at - workflow.now(), timedelta(0))

    def _until_next_wake(self) -> timedelta | None:
        """The loop's timer: to the next nudge, or sooner to the end of the pause the waiting turns' remember step
        waits for (none while a step runs: its end wakes the loop)."""
        nudge = self._until_next_nudge()
        if not self._waiting_to_remember():
            return nudge
        quiet = self._until_quiet()
        return quiet if nudge is None else min(nudge, quiet)

    def _awake(self) -> bool:
        """Whether the loop has something to do besides the timer's: a message, the end of a run, a change of plan."""
        return (bool(self._state.queue) or self._may_continue_as_new() or self._nudges_changed
                or self._remember_changed)

    def _set_alarm(self, wait: timedelta | None) -> None:
        """Have the loop woken within ``wait`` (keep-loop-timer). A timer that rings no later is kept: the loop, woken
        early, looks again and sets the next one. Without a wait the timer is kept too: one needless wake costs less
        than cancelling a timer at every turn."""
        if wait is None:
            return
        if wait <= timedelta(0):
            self._alarm_rang = True
            return
        at = workflow.now() + wait
        if self._alarm is not None and not self._alarm.done() and self._alarm_at is not None and self._alarm_at <= at:
            return
        if self._alarm is not None:
            self._alarm.cancel()
        self._alarm_at = at
        self._alarm = asyncio.create_task(self._ring(wait))

    async def _ring(self, wait: timedelta) -> None:
        await asyncio.sleep(wait.total_seconds())
        self._alarm_rang = True

    def _patched(self, patch: str) -> bool:
        """Whether this run takes the change of ``patch``, one of the patches older than patches-at-start."""
        return self._patched_at_start or workflow.patched(patch)

    def _may_continue_as_new(self) -> bool:
        # A waiting update (the terminal chat) must get its reply from this run, so wait for handlers to finish.
        long_run = (self._fresh_run or self._state.turns_this_run >= self._state.turns_per_run
                    or workflow.info().is_continue_as_new_suggested())
        return long_run and workflow.all_handlers_finished()

    def _reply(self, key: str) -> TurnReply | None:
        return next((reply for reply in self._state.replies if reply.message_key == key), None)

    def _is_queued(self, key: str) -> bool:
        return any(queued.message_key == key for queued in self._state.queue)


def _cause(err: ActivityError | ApplicationError) -> BaseException | None:
    """The error a failed step raised: a regular activity's is wrapped in an ActivityError, a local one's is not."""
    return err.cause if isinstance(err, ActivityError) else err


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= TRANSCRIPT_LINE_CHARS else flat[:TRANSCRIPT_LINE_CHARS - 1] + "…"


def _count(name: str, description: str, value: int = 1, **attributes: str) -> None:
    # Workflow metrics are not emitted again when a history is replayed.
    workflow.metric_meter().create_counter(name, description).add(value, attributes)


def _count_nudges(outcome: str, value: int = 1) -> None:
    _count("companion_nudges", "nudges leaving the pending list (sent, cancelled, failed, replaced) or postponed",
           value, outcome=outcome)
