"""CompanionWorkflow: one long-running workflow per user, id companion-user-<telegram id>.

Handlers only accept messages (deduplicated by key) into a queue; the run loop answers them in order: prepare_turn,
the reminders the message asked for, generate_reply (on the LLM task queue: queries and updates are answered
meanwhile; it sends a Telegram reply as soon as it is written), deliver (what generate_reply could not send, or the
fallback), and, once the user pauses, remember. Pinned to the build it runs on, the workflow continues as new
between turns, onto the current build, when that changed or its history grew long. Its state is small: text lives
in PostgreSQL.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from core.errors import TelegramBlockedError
    from schemas.memory import Channel, MemoryItemKind, NudgeKind, NudgeStatus
    from schemas.turn import (
        REPLIES_KEPT,
        SEEN_KEYS_KEPT,
        CompanionState,
        Exported,
        Forgotten,
        GenerateReplyInput,
        IncomingMessage,
        MemoryListing,
        Nudge,
        PersonaChange,
        TimezoneChange,
        TimezoneChanged,
        TurnReply,
        UserRef,
        nudge_message_key,
    )
    from schemas.usage import UsageSummary
    from workflows import contract, steps
    from workflows import nudges as book
    from workflows.alarm import Alarm
    from workflows.operator_view import add_transcript, clip, count
    from workflows.remembering import RememberQueue

MAX_QUEUED = 100
FALLBACK_REPLY = ("I'm sorry, I can't think straight right now: my language model isn't answering. I've kept your "
                  "message and I'll remember it. Could you try me again in a little while?")
SLOW_DOWN = ("You're writing faster than I can keep up with: I answer up to {limit} messages a minute. I've kept this "
             "one; give me a moment, then go on.")
OVER_BUDGET = ("I've reached today's limit for our conversations, so I can't answer properly right now. I've kept your "
               "message, and I'll be back after midnight, {zone} time.")
RATE_WINDOW = timedelta(minutes=1)
UNHEARD = ("I'm sorry, I couldn't listen to your voice message just now: my transcription isn't working. I've kept "
           "it; could you type what you said, or send it again in a little while?")
UNSEEN = ("I'm sorry, I couldn't look at your photo just now: my vision isn't working. I've kept it; could you tell "
          "me what it shows, or send it again in a little while?")
FAILED_REPLY = "I'm sorry, something went wrong on my side and I couldn't take in that message. Please send it again."
BLOCKED = TelegramBlockedError.__name__  # the failure of a send to a user who blocked the bot
BLOCKED_REASON = "the user blocked the bot"
FAILED_STEP = (ActivityError, ApplicationError)  # a regular activity's failure; a local activity's, unwrapped


@workflow.defn(name=contract.WORKFLOW_TYPE)
class CompanionWorkflow:
    """A user's conversation with the companion: PINNED to its build by versioned workers (worker.build_worker;
    declared here, the behavior would refuse the unversioned workers of the tests)."""

    @workflow.init
    def __init__(self, state: CompanionState) -> None:
        self._state = state
        self._lock = asyncio.Lock()  # a turn, a firing nudge and /forget each touch the user's rows: one at a time
        self._alarm = Alarm()
        self._replan = False  # nudges changed or a remember step ended: the loop sets its alarm anew
        self._fresh_run = False  # set by /forget: continue as new so the erased turns leave the open history
        self._to_remember = RememberQueue()

    @workflow.run
    async def run(self, state: CompanionState) -> None:
        """Answer queued messages in order and fire nudges when due; continue as new between turns."""
        while True:
            self._replan = False
            self._alarm.set(*self._next_wake())
            await workflow.wait_condition(lambda: self._awake() or self._alarm.rang)
            self._alarm.clear()
            if self._to_remember.due(self._state, workflow.now()):
                self._start_remembering()
            if self._may_move_on():
                await self._wind_down()
                if self._may_move_on():  # again: an update may have come in meanwhile
                    # The memo as it is now (after /forget, without the user's name), not the one the run began with.
                    workflow.continue_as_new(
                        self._state.model_copy(update={"turns_this_run": 0}),
                        memo={"user_name": self._state.display_name, "telegram_id": self._state.telegram_id},
                        initial_versioning_behavior=workflow.ContinueAsNewVersioningBehavior.AUTO_UPGRADE)
            async with self._lock:
                if self._state.queue:
                    await self._answer(self._state.queue[0])
                    self._state.queue.pop(0)
                elif (nudge := book.due(self._state, workflow.now())) is not None:
                    await self._fire(nudge)

    # --- messages, queries and updates ---------------------------------------------------------------------------

    @workflow.signal(name=contract.MESSAGE)
    def message(self, message: IncomingMessage) -> None:
        """A message to answer; its reply is delivered on its channel."""
        if (refusal := self._refusal(message)) is not None:  # a signal cannot be refused to its sender: log, drop
            workflow.logger.warning("message dropped", extra={"message_key": message.message_key, "reason": refusal})
            return
        self._accept(message)

    @workflow.update(name=contract.SEND)
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
        if (refusal := self._refusal(message)) is not None:
            raise ValueError(refusal)

    @workflow.signal(name=contract.WAKE)
    def wake(self) -> None:
        """Look again now: a conversation whose build is no longer current moves to the current one."""
        self._replan = True

    @workflow.query(name=contract.STATE)
    def state(self) -> CompanionState:
        """The workflow's state: queue, counters, recent replies and transcript."""
        return self._state

    @workflow.query(name=contract.NUDGES)
    def nudges(self) -> list[Nudge]:
        """The pending nudges, soonest first."""
        return self._state.nudges

    @workflow.update(name=contract.SCHEDULE_NUDGE)
    async def schedule_nudge(self, nudge: Nudge) -> Nudge:
        """Schedule a proactive message; its audit record is written before the timer counts."""
        user_id = await self._ensure_user()
        await steps.record_nudge(user_id, nudge)
        self._add_nudge(nudge)
        return nudge

    @schedule_nudge.validator
    def _validate_schedule(self, nudge: Nudge) -> None:
        if (refusal := book.refusal(self._state, nudge, workflow.now())) is not None:
            raise ValueError(refusal)

    @workflow.update(name=contract.CANCEL_NUDGE)
    async def cancel_nudge(self, nudge_id: str) -> Nudge:
        """Cancel a pending nudge: its timer stops counting and its record says cancelled."""
        nudge = book.pending(self._state, nudge_id)
        assert nudge is not None  # the validator saw it pending, and nothing ran in between
        self._drop_nudges([nudge_id], "cancelled")
        await steps.set_nudge_status(nudge_id, NudgeStatus.CANCELLED)
        return nudge

    @cancel_nudge.validator
    def _validate_cancel(self, nudge_id: str) -> None:
        if (refusal := book.cancel_refusal(self._state, nudge_id)) is not None:
            raise ValueError(refusal)

    @workflow.update(name=contract.SET_CHECKINS)
    async def set_checkins(self, enabled: bool) -> list[Nudge]:
        """Turn the companion's check-ins on or off (/quiet); turning them off cancels pending ones."""
        self._state.checkins = enabled
        cancelled = [nudge for nudge in self._state.nudges if nudge.kind == NudgeKind.CHECK_IN] if not enabled else []
        for nudge in cancelled:
            await self.cancel_nudge(nudge.nudge_id)
        return cancelled

    @workflow.update(name=contract.SET_TIMEZONE)
    async def set_timezone(self, change: TimezoneChange) -> TimezoneChanged:
        """Set the user's time zone (/timezone, a shared location, an operator): from then on their messages are
        read, and their quiet hours kept, in it, and their reminders and follow-ups move to the same time of day
        there."""
        async with self._lock:  # not while a turn reads the zone or a nudge fires
            user_id = await self._ensure_user()
            changed = await steps.set_timezone(user_id, change, self._state.timezone, self._state.nudges)
            self._state.timezone = changed.zone
            book.move(self._state, changed.moved)
            self._replan = True
        return changed

    @workflow.update(name=contract.PERSONA)
    async def persona(self, change: PersonaChange) -> str | None:
        """The companion's name and tone for this user (/persona): set, reset, or only read; returns it as it now is
        (None: the companion's own). The next reply is written with it."""
        async with self._lock:  # not in the middle of a turn, which reads it
            return await steps.set_persona(await self._ensure_user(), change)

    @workflow.update(name=contract.USAGE)
    async def usage(self, everyone: bool = False) -> UsageSummary:
        """What the user's model calls (everyone's, for an admin) used and cost today and this month (/usage)."""
        return await steps.usage_summary(None if everyone else self._state.telegram_id, self._state.timezone)

    @workflow.update(name=contract.MEMORY)
    async def memory(self) -> MemoryListing:
        """What the companion remembers of the user, as they may see and correct it (/memory)."""
        return await steps.list_memory(await self._ensure_user())

    @workflow.update(name=contract.FORGET_ITEM)
    async def forget_item(self, ref: str) -> bool:
        """Forget one thing /memory listed, by its ref: a fact, event or diary entry with the memories that repeat
        it, or a pending nudge (cancelled). False when it was gone already."""
        kind, _, name = ref.partition(":")
        if kind == MemoryItemKind.NUDGE:
            if book.cancel_refusal(self._state, name) is not None:
                return False
            await self.cancel_nudge(name)
            return True
        async with self._lock:  # not while a remember step or a turn writes the rows
            await workflow.wait_condition(lambda: not self._to_remember.running)
            return await steps.forget_item(await self._ensure_user(), ref)

    @forget_item.validator
    def _validate_forget_item(self, ref: str) -> None:
        kind, _, name = ref.partition(":")
        if kind not in set(MemoryItemKind) or not name:
            raise ValueError(f"{ref!r} names nothing /memory lists")

    @workflow.update(name=contract.EXPORT)
    async def export(self) -> Exported:
        """Send the user, in their private chat, everything kept of them (/export): between turns, so it holds the
        last reply."""
        async with self._lock:
            return await steps.send_export(self._state.telegram_id)

    @workflow.update(name=contract.FORGET)
    async def forget(self) -> Forgotten:
        """Erase everything remembered of the user (/forget): their rows, pending nudges, replies and transcript."""
        async with self._lock:  # never in the middle of a turn that is writing the rows
            await workflow.wait_condition(lambda: not self._to_remember.running)
            self._to_remember.waiting = []  # about to be erased: no remember step may index them again
            forgotten = await steps.forget_user(self._state.telegram_id)
            cancelled = len(self._state.nudges)
            self._drop_nudges([nudge.nudge_id for nudge in self._state.nudges], "cancelled")
            self._state = self._state.model_copy(update={
                "user_id": None, "display_name": None, "replies": [], "transcript": [], "summary": "",
                "last_turn_at": None})
            self._fresh_run = True
            workflow.set_current_details("")
            workflow.upsert_memo({"user_name": None})
        return forgotten.model_copy(update={"nudges_cancelled": cancelled, "run_id": workflow.info().run_id})

    def _refusal(self, message: IncomingMessage) -> str | None:
        """Why a message cannot be accepted, or None."""
        if message.user.telegram_id != self._state.telegram_id:
            return f"this workflow belongs to user {self._state.telegram_id}"
        if len(self._state.queue) >= MAX_QUEUED and not self._is_queued(message.message_key):
            return "too many messages are waiting; try again shortly"
        return None

    def _accept(self, message: IncomingMessage) -> None:
        if message.message_key in self._state.seen_keys:
            return  # a redelivered message: answered or queued already
        self._state.seen_keys = [*self._state.seen_keys, message.message_key][-SEEN_KEYS_KEPT:]
        self._state.queue.append(message)
        # The rate limit, by when messages arrive: over it, the message is kept and its sender asked to slow down.
        if (limit := self._state.messages_per_minute) > 0:
            now = workflow.now()
            recent = [at for at in self._state.recent_arrivals if at > now - RATE_WINDOW]
            if len(recent) >= limit:
                self._state.slowed = [*self._state.slowed, message.message_key][-MAX_QUEUED:]
            else:
                recent.append(now)
            self._state.recent_arrivals = recent

    # --- the turn --------------------------------------------------------------------------------------------------

    async def _answer(self, message: IncomingMessage) -> None:
        try:
            reply = await self._turn(message)
        except FAILED_STEP as err:  # a storage step refused the message for good: the conversation goes on
            workflow.logger.error("turn failed", extra={"message_key": message.message_key,
                                                       "error": str(_cause(err))})
            reply = TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=FAILED_REPLY,
                              fallback=True)
        self._state.replies = [*self._state.replies, reply][-REPLIES_KEPT:]
        if reply.text != FAILED_REPLY and not reply.limited:
            self._to_remember.waiting.append(message.message_key)  # the loop starts the step when it is due

    async def _turn(self, message: IncomingMessage) -> TurnReply:
        self._state.channel, self._state.chat_id = message.channel, message.chat_id
        limited = await self._over_limit(message)  # before any paid call
        understood = True
        if message.attachment is not None and limited is None:  # the transcript or description becomes the message
            message, understood = await self._understand(message)
        prepared = await steps.prepare_turn(message)
        user_id = self._know(prepared.user)
        if self._state.blocked:  # they wrote again, so they can be reached again
            await self._set_active(user_id, True)
        # A reminder asked for is set before the reply that confirms it is written, and so before the user can read
        # it: generate_reply sends a Telegram reply as soon as it is written, and /nudges or /memory then lists it.
        for nudge in (prepared.reminder, prepared.follow_up):
            if nudge is not None:
                await self._schedule_own(user_id, nudge)
        if limited is not None:
            await steps.store_fallback(user_id, message, limited)  # kept apart from the conversation the model reads
            reply = TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=limited,
                              limited=True)
        elif understood:
            reply = await self._generate(user_id, message, prepared.note)
        else:
            assert message.attachment is not None
            reply = await self._fallback(user_id, message, UNHEARD if message.attachment.kind.heard else UNSEEN)
        self._after_turn(message, reply.text, reply.fallback)
        if message.channel == Channel.TELEGRAM:  # sends what generate_reply could not (or the fallback)
            await self._deliver(user_id, message.chat_id, message.reply_key)
        await self._plan_checkin(user_id)
        return reply

    async def _generate(self, user_id: int, message: IncomingMessage, note: str | None) -> TurnReply:
        """The reply: the LLM's, within the reply deadline, or the fallback, stored."""
        data = GenerateReplyInput(user_id=user_id, message_key=message.message_key, reply_key=message.reply_key,
                                  text=message.text, channel=message.channel, chat_id=message.chat_id,
                                  summary=self._state.summary, note=note)
        try:
            generated = await steps.generate_reply(data, timedelta(seconds=self._state.reply_deadline_s))
            return TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=generated.text,
                             model=generated.model)
        except ActivityError as err:
            workflow.logger.warning("LLM failed, sending the fallback reply",
                                    extra={"message_key": message.message_key, "error": str(_cause(err))})
        return await self._fallback(user_id, message, FALLBACK_REPLY)

    async def _fallback(self, user_id: int, message: IncomingMessage, text: str) -> TurnReply:
        """An honest reply written without the LLM, stored."""
        self._state.fallbacks += 1
        await steps.store_fallback(user_id, message, text)
        return TurnReply(message_key=message.message_key, reply_key=message.reply_key, text=text, fallback=True)

    async def _over_limit(self, message: IncomingMessage) -> str | None:
        """The answer a limit gives instead of the model (too many messages a minute, the daily budget spent), or
        None. An exempt user has none; the limits are read only when one may apply."""
        slowed = message.message_key in self._state.slowed
        self._state.slowed = [key for key in self._state.slowed if key != message.message_key]
        if not slowed and not self._state.budgeted:
            return None
        standing = await steps.check_limits(self._state.telegram_id, self._state.timezone)
        if standing.unlimited:
            return None
        if slowed:
            count("companion_limited_messages", "messages answered by a limit instead of the model", limit="rate")
            return SLOW_DOWN.format(limit=self._state.messages_per_minute)
        if standing.over_budget_until is not None:
            count("companion_limited_messages", "messages answered by a limit instead of the model", limit="budget")
            return OVER_BUDGET.format(zone=self._state.timezone)
        return None

    async def _understand(self, message: IncomingMessage) -> tuple[IncomingMessage, bool]:
        """The message with its attachment's transcript or description as its text; unchanged (its placeholder
        text kept) and False when the transcription or vision model failed for good."""
        assert message.attachment is not None
        try:
            understood = await steps.understand(message, timedelta(seconds=self._state.reply_deadline_s))
        except ActivityError as err:
            workflow.logger.warning("the attachment could not be understood", extra={
                "message_key": message.message_key, "kind": message.attachment.kind.value,
                "error": str(_cause(err))})
            return message, False
        return message.model_copy(update={"text": understood.text}), True

    def _after_turn(self, message: IncomingMessage, reply: str, fallback: bool) -> None:
        count("companion_turns", "conversation turns answered", channel=message.channel.value)
        if fallback:
            count("companion_fallback_replies", "turns answered with the fallback reply")
        self._state.turns += 1
        self._state.turns_this_run += 1
        self._state.last_turn_at = workflow.now()
        name = self._state.display_name or "user"
        add_transcript(self._state, [f"**{name}**: {clip(message.text)}",
                                     f"**companion**{' (fallback)' if fallback else ''}: {clip(reply)}"])

    async def _deliver(self, user_id: int, chat_id: int, message_key: str) -> None:
        """Send a stored message to Telegram; a user who blocked the bot is marked out of reach."""
        try:
            await steps.deliver(user_id, chat_id, message_key)
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
            self._drop_nudges([nudge.nudge_id for nudge in self._state.nudges], "cancelled")
        await steps.set_user_active(user_id, active, None if active else BLOCKED_REASON)

    async def _ensure_user(self) -> int:
        """The stored user's id, created for a nudge or an update that comes before their first message."""
        known = self._state.user_id
        return known if known is not None else self._know(await steps.ensure_user(self._state.telegram_id))

    def _know(self, user: UserRef) -> int:
        """Take in the stored user (new, or created again after their rows went); the memo names them for the UI."""
        if user.display_name != self._state.display_name:
            workflow.upsert_memo({"user_name": user.display_name, "telegram_id": self._state.telegram_id})
        self._state.user_id, self._state.display_name, self._state.timezone = (user.user_id, user.display_name,
                                                                                user.timezone)
        return user.user_id

    # --- remember ---------------------------------------------------------------------------------------------------

    def _start_remembering(self) -> None:
        asyncio.create_task(self._remember(self._state.user_id, self._to_remember.take()))

    async def _remember(self, user_id: int | None, turns: list[str]) -> None:
        """Memories from turns after their replies, and the reminders and running summary the step found."""
        assert user_id is not None
        try:
            # Remembered later than it was said: "tomorrow" still means the day after the last turn.
            remembered = await steps.remember(user_id, turns, self._state.last_turn_at or workflow.now(),
                                              self._state.summary)
            if remembered.summary:
                self._state.summary = remembered.summary
            for nudge in remembered.reminders:
                if self._state.user_id == user_id:  # not forgotten meanwhile
                    await self._schedule_own(user_id, nudge)
        except ActivityError as err:
            workflow.logger.error("remember step failed", extra={"message_key": turns[-1],
                                                                "error": str(_cause(err))})
        finally:
            self._to_remember.running = False
            self._replan = True  # the loop starts the next step when it is due

    async def _wind_down(self) -> None:
        """Before the run ends, the turns waiting are remembered and every remember step lands: they bring the
        summary the next run carries."""
        while self._to_remember.running or self._to_remember.waits(self._state):
            if not self._to_remember.running:
                self._start_remembering()
            await workflow.wait_condition(lambda: not self._to_remember.running)

    # --- nudges -----------------------------------------------------------------------------------------------------

    async def _fire(self, nudge: Nudge) -> None:
        self._drop_nudges([nudge.nudge_id], None)  # from here on a cancel is refused rather than racing the send
        user_id = await self._ensure_user()
        try:
            fired = await steps.fire_nudge(user_id, nudge, self._state.channel)
        except ActivityError as err:
            workflow.logger.warning("nudge failed", extra={"nudge_id": nudge.nudge_id, "error": str(_cause(err))})
            book.count("failed")
            await steps.set_nudge_status(nudge.nudge_id, NudgeStatus.FAILED, str(_cause(err)))
            return
        if fired.postponed_until is not None:  # the user's quiet hours: pending again, until they end
            self._state.done_nudges.remove(nudge.nudge_id)
            self._add_nudge(nudge.model_copy(update={"at": fired.postponed_until}))
            book.count("postponed")
            return
        book.count("sent")
        add_transcript(self._state, [f"**companion** (nudge): {clip(fired.text)}"])
        if self._state.channel == Channel.TELEGRAM:
            # A nudge is personal: to the user's private chat (its id is theirs), never the group they wrote in last.
            await self._deliver(user_id, self._state.telegram_id, nudge_message_key(nudge.nudge_id))

    async def _schedule_own(self, user_id: int, nudge: Nudge) -> None:
        """Schedule a nudge the companion decided on (a reminder asked for), unless the rules refuse it."""
        if (refusal := book.refusal(self._state, nudge, workflow.now())) is not None:
            workflow.logger.warning("nudge not scheduled", extra={"nudge_id": nudge.nudge_id, "reason": refusal})
            return
        await steps.record_nudge(user_id, nudge)
        self._add_nudge(nudge)

    async def _plan_checkin(self, user_id: int) -> None:
        """Move the check-in to N days after this message: any message from the user resets the silence."""
        planned = book.next_checkin(self._state, workflow.now(), f"checkin-{workflow.uuid4().hex[:16]}")
        if planned is None:
            return
        old, nudge = planned
        await steps.plan_checkin(user_id, old, nudge, self._state.checkin_after_days)
        if old is not None:
            self._drop_nudges([old.nudge_id], "replaced")
        self._add_nudge(nudge)

    def _add_nudge(self, nudge: Nudge) -> None:
        book.add(self._state, nudge)
        self._replan = True

    def _drop_nudges(self, nudge_ids: list[str], outcome: str | None) -> None:
        book.drop(self._state, nudge_ids, outcome)
        self._replan = True

    def _next_wake(self) -> tuple[timedelta | None, str]:
        """How long the loop may sleep, and why it wakes then: the next nudge, or sooner the end of the pause the
        waiting turns' remember step waits for (none while a step runs: its end wakes the loop)."""
        nudge = book.until_next(self._state, workflow.now())
        pause = self._to_remember.until_due(self._state, workflow.now())
        if pause is not None and (nudge is None or pause < nudge):
            return pause, "remember when the user pauses"
        return nudge, "next nudge"

    def _awake(self) -> bool:
        """Whether the loop has something to do besides the alarm's: a message, the end of a run, a change of plan."""
        return bool(self._state.queue) or self._replan or self._may_move_on()

    def _may_move_on(self) -> bool:
        """Whether this run ends here: the deployment's current build changed (the conversation moves to it), the
        history grew long, or /forget asked for a fresh run. A waiting update gets its reply from this run first."""
        info = workflow.info()
        due = (self._fresh_run or self._state.turns_this_run >= self._state.turns_per_run
               or info.is_continue_as_new_suggested() or info.is_target_worker_deployment_version_changed())
        return due and workflow.all_handlers_finished()

    def _reply(self, key: str) -> TurnReply | None:
        return next((reply for reply in self._state.replies if reply.message_key == key), None)

    def _is_queued(self, key: str) -> bool:
        return any(queued.message_key == key for queued in self._state.queue)


def _cause(err: ActivityError | ApplicationError) -> BaseException | None:
    """What a failed step raised: a regular activity's error is wrapped in an ActivityError, a local one's is not."""
    return err.cause if isinstance(err, ActivityError) else err
