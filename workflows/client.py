"""Talking to users' workflows from outside: connect, send a message and wait for its reply, or signal it."""

from __future__ import annotations

from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter

from core.settings import Settings
from schemas.turn import CompanionState, IncomingMessage, TurnReply
from workflows.companion import USER_ID_ATTRIBUTE, CompanionWorkflow, workflow_id


async def connect(settings: Settings) -> Client:
    """A Temporal client that reads and writes payloads as JSON (pydantic), so the UI shows them readably."""
    return await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace,
                                data_converter=pydantic_data_converter)


def _start_options(settings: Settings, message: IncomingMessage) -> dict:
    telegram_id = message.user.telegram_id
    return {
        "id": workflow_id(telegram_id),
        "task_queue": settings.temporal_task_queue,
        "search_attributes": TypedSearchAttributes([SearchAttributePair(USER_ID_ATTRIBUTE, telegram_id)]),
        "memo": {"user_name": message.user.display_name, "telegram_id": telegram_id},
    }


def _initial_state(settings: Settings, message: IncomingMessage) -> CompanionState:
    return CompanionState(telegram_id=message.user.telegram_id, turns_per_run=settings.workflow_turns_per_run)


async def send_message(client: Client, settings: Settings, message: IncomingMessage) -> TurnReply:
    """Deliver a message to its user's workflow (starting it if need be) and return the reply, in one call."""
    start = WithStartWorkflowOperation(CompanionWorkflow.run, _initial_state(settings, message),
                                       id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                                       **_start_options(settings, message))
    return await client.execute_update_with_start_workflow(CompanionWorkflow.send, message,
                                                           start_workflow_operation=start)


async def signal_message(client: Client, settings: Settings, message: IncomingMessage) -> None:
    """Signal-with-start: hand a message to its user's workflow without waiting for the reply."""
    await client.start_workflow(CompanionWorkflow.run, _initial_state(settings, message),
                                start_signal="message", start_signal_args=[message],
                                **_start_options(settings, message))
