"""Talking to users' workflows from outside: connect, send a message and wait for its reply, or signal it.

Workflows, signals and updates are named (workflows.contract), not imported: a command that only talks to a workflow
starts without loading the workflow's activities and their libraries."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, Interceptor, WithStartWorkflowOperation, WorkflowUpdateFailedError
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.envconfig import ClientConfigProfile
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from core.logging import get_logger
from core.settings import Settings
from schemas.turn import (
    ChatUser,
    CompanionState,
    Exported,
    Forgotten,
    IncomingMessage,
    MemoryListing,
    Nudge,
    PersonaChange,
    TimezoneChange,
    TimezoneChanged,
    TurnReply,
)
from schemas.usage import UsageSummary
from workflows import contract
from workflows.contract import USER_ID_ATTRIBUTE, workflow_id

T = TypeVar("T")
# How a workflow refuses an update its build lacks (temporalio's wording), and how often to wake it and ask again.
NO_HANDLER = "expected but not found"
MOVE_ON_TRIES = 5
MOVE_ON_WAIT_S = 0.5
# /forget waits this long for the run that erased the user's data to close before deleting the closed runs.
FORGET_DELETE_TIMEOUT_S = 20.0

_log = get_logger(__name__)


def connect_options(settings: Settings) -> dict[str, Any]:
    """Client.connect's address, namespace, API key and TLS, through Temporal's envconfig (as its CLI reads them)."""
    names = {"TEMPORAL_ADDRESS": settings.temporal_address, "TEMPORAL_NAMESPACE": settings.temporal_namespace}
    if settings.temporal_api_key is not None:
        names["TEMPORAL_API_KEY"] = settings.temporal_api_key.get_secret_value()
    if settings.temporal_tls_client_cert_path is not None and settings.temporal_tls_client_key_path is not None:
        names["TEMPORAL_TLS_CLIENT_CERT_PATH"] = str(settings.temporal_tls_client_cert_path)
        names["TEMPORAL_TLS_CLIENT_KEY_PATH"] = str(settings.temporal_tls_client_key_path)
    # Settings are the one source: no other environment variable or config file joins in.
    return dict(ClientConfigProfile.load(override_env_vars=names, disable_file=True).to_client_connect_config())


def data_converter(settings: Settings) -> DataConverter:
    """Payloads as JSON (pydantic), so the UI shows them readably; encrypted with PAYLOAD_KEYS when set (then the UI
    reads them through the codec server)."""
    codec = settings.payload_codec
    return pydantic_data_converter if codec is None else dataclasses.replace(pydantic_data_converter,
                                                                             payload_codec=codec)


async def connect(settings: Settings, runtime: Runtime | None = None,
                  interceptors: Sequence[Interceptor] = ()) -> Client:
    """A Temporal client with the companion's data converter (data_converter)."""
    return await Client.connect(**connect_options(settings), data_converter=data_converter(settings),
                                runtime=runtime, interceptors=interceptors)


def _start_options(settings: Settings, user: ChatUser) -> dict:
    return {
        "id": workflow_id(user.telegram_id),
        "task_queue": settings.temporal_task_queue,
        "search_attributes": TypedSearchAttributes([SearchAttributePair(USER_ID_ATTRIBUTE, user.telegram_id)]),
        "memo": {"user_name": user.display_name, "telegram_id": user.telegram_id},
        # The Summary the Temporal UI shows in its list and on the workflow's page (its current details hold the
        # recent transcript).
        "static_summary": f"Conversation with {user.display_name} (Telegram id {user.telegram_id})",
    }


def _initial_state(settings: Settings, telegram_id: int) -> CompanionState:
    return CompanionState(telegram_id=telegram_id, turns_per_run=settings.workflow_turns_per_run,
                          checkin_after_days=settings.checkin_after_days,
                          remember_after_quiet_s=settings.remember_after_quiet_seconds,
                          reply_deadline_s=settings.reply_deadline_seconds,
                          messages_per_minute=settings.user_messages_per_minute, budgeted=settings.limits.any)


def _start(settings: Settings, user: ChatUser) -> WithStartWorkflowOperation:
    return WithStartWorkflowOperation(contract.WORKFLOW_TYPE, _initial_state(settings, user.telegram_id),
                                      id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                                      **_start_options(settings, user))


async def send_message(client: Client, settings: Settings, message: IncomingMessage) -> TurnReply:
    """Deliver a message to its user's workflow (starting it if need be) and return the reply, in one call."""
    return await client.execute_update_with_start_workflow(contract.SEND, message, result_type=TurnReply,
                                                           start_workflow_operation=_start(settings, message.user))


async def signal_message(client: Client, settings: Settings, message: IncomingMessage) -> None:
    """Signal-with-start: hand a message to its user's workflow without waiting for the reply."""
    await client.start_workflow(contract.WORKFLOW_TYPE, _initial_state(settings, message.user.telegram_id),
                                start_signal=contract.MESSAGE, start_signal_args=[message],
                                **_start_options(settings, message.user))


async def schedule_nudge(client: Client, settings: Settings, telegram_id: int, request: Nudge) -> Nudge:
    """Schedule a nudge in a user's workflow, starting the workflow for a user it has not met yet."""
    return await client.execute_update_with_start_workflow(
        contract.SCHEDULE_NUDGE, request, result_type=Nudge,
        start_workflow_operation=_start(settings, ChatUser(telegram_id=telegram_id)))


async def cancel_nudge(client: Client, telegram_id: int, nudge_id: str) -> Nudge:
    """Cancel a pending nudge of a user."""
    return await client.get_workflow_handle(workflow_id(telegram_id)).execute_update(contract.CANCEL_NUDGE, nudge_id,
                                                                                     result_type=Nudge)


async def forget(client: Client, settings: Settings, user: ChatUser, delete_runs: bool = True) -> Forgotten:
    """Erase everything remembered of a user (their workflow is started if need be: rows may outlive it), then the
    closed runs of their workflow, whose histories hold what was erased (delete_closed_runs)."""
    forgotten = await client.execute_update_with_start_workflow(contract.FORGET, result_type=Forgotten,
                                                                start_workflow_operation=_start(settings, user))
    if forgotten.run_id is None or not delete_runs:  # None: answered by a build from before runs were deleted
        return forgotten
    try:
        deleted = await delete_closed_runs(client, user.telegram_id, forgotten.run_id)
    except (RPCError, TimeoutError) as exc:
        _log.warning("forget.runs_not_deleted", telegram_id=user.telegram_id, error=str(exc))
        deleted = 0
    return forgotten.model_copy(update={"runs_deleted": deleted})


async def delete_closed_runs(client: Client, telegram_id: int, erased_in: str,
                             timeout_s: float = FORGET_DELETE_TIMEOUT_S) -> int:
    """Delete every closed run of the user's workflow once ``erased_in`` (the run that erased their data) has
    continued as new: the open run then holds none of it. Returns how many were deleted."""
    handle = client.get_workflow_handle(workflow_id(telegram_id))
    deadline = asyncio.get_running_loop().time() + timeout_s
    query = f"{USER_ID_ATTRIBUTE.name} = {telegram_id} AND ExecutionStatus != 'Running'"
    while True:
        current = (await handle.describe()).run_id
        # Visibility lags: wait until it lists the erasing run as closed too.
        closed = [execution.run_id async for execution in client.list_workflows(query)] if current != erased_in else []
        if erased_in in closed:
            break
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"run {erased_in} of user {telegram_id} did not close within {timeout_s:.0f} s")
        await asyncio.sleep(0.2)
    for run_id in closed:
        await client.workflow_service.delete_workflow_execution(DeleteWorkflowExecutionRequest(
            namespace=client.namespace, workflow_execution=WorkflowExecution(workflow_id=handle.id, run_id=run_id)))
    _log.info("forget.runs_deleted", telegram_id=telegram_id, runs=len(closed))
    return len(closed)


async def set_timezone(client: Client, settings: Settings, user: ChatUser, change: TimezoneChange) -> TimezoneChanged:
    """Set a user's time zone (their workflow is started if need be); returns the nudges that moved with it."""
    return await _newer_update(client, settings, user, contract.SET_TIMEZONE, [change], TimezoneChanged)


async def usage(client: Client, settings: Settings, user: ChatUser, everyone: bool = False) -> UsageSummary:
    """A user's usage today and this month in their time zone (everyone's, with ``everyone``), and the limits."""
    return await _newer_update(client, settings, user, contract.USAGE, [everyone], UsageSummary)


async def memory(client: Client, settings: Settings, user: ChatUser) -> MemoryListing:
    """What the companion remembers of a user, numbered as /memory shows it."""
    return await _newer_update(client, settings, user, contract.MEMORY, [], MemoryListing)


async def forget_item(client: Client, settings: Settings, user: ChatUser, ref: str) -> bool:
    """Forget one thing /memory listed; False when it was gone already."""
    return await _newer_update(client, settings, user, contract.FORGET_ITEM, [ref], bool)


async def persona(client: Client, settings: Settings, user: ChatUser, change: PersonaChange) -> str | None:
    """Set, reset or read the companion's persona for a user; returns it as it now is (None: its own)."""
    return await _newer_update(client, settings, user, contract.PERSONA, [change], str | None)


async def export(client: Client, settings: Settings, user: ChatUser) -> Exported:
    """Send a user everything kept of them, in their private Telegram chat."""
    return await _newer_update(client, settings, user, contract.EXPORT, [], Exported)


async def _newer_update(client: Client, settings: Settings, user: ChatUser, update: str, args: list[Any],
                        result_type: type[T]) -> T:
    """An update-with-start of an update a conversation's build may lack: one idle since the deploy that added it
    refuses it, so it is woken, which moves it to the current build at once, and asked again."""

    def ask() -> Awaitable[T]:
        return client.execute_update_with_start_workflow(update, args=args, result_type=result_type,
                                                         start_workflow_operation=_start(settings, user))

    for _ in range(MOVE_ON_TRIES - 1):
        try:
            return await ask()
        except WorkflowUpdateFailedError as exc:
            if NO_HANDLER not in str(exc.cause):
                raise
        await client.get_workflow_handle(workflow_id(user.telegram_id)).signal(contract.WAKE)
        await asyncio.sleep(MOVE_ON_WAIT_S)
    return await ask()


async def set_checkins(client: Client, settings: Settings, user: ChatUser, enabled: bool) -> list[Nudge]:
    """Turn a user's check-ins on or off; returns the check-ins this cancelled."""
    return await client.execute_update_with_start_workflow(contract.SET_CHECKINS, enabled, result_type=list[Nudge],
                                                           start_workflow_operation=_start(settings, user))
