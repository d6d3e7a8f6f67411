"""The worker skips the SDK's payload passes only while they cannot change a payload (core.payload_passes)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
import temporalio.bridge.worker as bridge_worker
from temporalio import activity, workflow
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import PayloadCodec
from temporalio.worker import Worker

from core import payload_passes
from tests.conftest import SharedDevServer
from worker import WORKFLOW_RUNNER

MARKED = b"binary/marked"


class MarkingCodec(PayloadCodec):
    """Wraps every payload in another, as an encrypting codec would: unwrapped, a payload cannot be read."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [Payload(metadata={"encoding": MARKED}, data=payload.SerializeToString()) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [Payload.FromString(payload.data) if payload.metadata.get("encoding") == MARKED else payload
                for payload in payloads]


@activity.defn
async def shout(text: str) -> str:
    return text.upper()


@workflow.defn(sandboxed=True)
class Shout:
    @workflow.run
    async def run(self, text: str) -> str:
        loud = await workflow.execute_local_activity(shout, text, start_to_close_timeout=timedelta(seconds=10))
        return f"{loud}!"


@pytest.fixture
def sdk_passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The skip installed, and the names of the SDK's passes as they run."""
    assert payload_passes.install()
    ran: list[str] = []
    for name, original in list(payload_passes._ORIGINALS.items()):
        async def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            ran.append(_name)
            return await _original(*args, **kwargs)
        monkeypatch.setitem(payload_passes._ORIGINALS, name, counted)
    return ran


async def _shout(client: Client, text: str) -> tuple[str, list[Payload]]:
    """Run Shout on a worker of ``client``: its result, and the payloads of its history's events."""
    task_queue = f"passes-{uuid.uuid4()}"
    async with Worker(client, task_queue=task_queue, workflows=[Shout], activities=[shout],
                      workflow_runner=WORKFLOW_RUNNER):
        handle = await client.start_workflow(Shout.run, text, id=f"shout-{uuid.uuid4()}", task_queue=task_queue,
                                             execution_timeout=timedelta(seconds=30))
        result = await handle.result()
    history = await handle.fetch_history()
    payloads = []
    for event in history.events:
        payloads += event.workflow_execution_started_event_attributes.input.payloads
        if "result" in event.marker_recorded_event_attributes.details:  # the local activity's
            payloads += event.marker_recorded_event_attributes.details["result"].payloads
        payloads += event.workflow_execution_completed_event_attributes.result.payloads
    return result, payloads


async def test_without_codec_the_passes_are_skipped_and_payloads_reach_the_server_as_they_are(
        dev_server: SharedDevServer, sdk_passes: list[str]) -> None:
    env = await dev_server.get()
    result, payloads = await _shout(env.client, "hello")
    assert result == "HELLO!"
    assert sdk_passes == []
    assert len(payloads) == 3  # input, the local activity's result, the workflow's result
    assert {payload.metadata["encoding"] for payload in payloads} == {b"json/plain"}


async def test_with_a_codec_every_pass_runs_and_the_server_sees_only_encoded_payloads(
        dev_server: SharedDevServer, sdk_passes: list[str]) -> None:
    env = await dev_server.get()
    config = env.client.config()
    config["data_converter"] = dataclasses.replace(pydantic_data_converter, payload_codec=MarkingCodec())
    client = Client(**config)
    result, payloads = await _shout(client, "hello")
    assert result == "HELLO!"  # the workflow read decoded payloads: the worker's passes decoded them
    assert "decode_activation" in sdk_passes and "encode_completion" in sdk_passes
    assert len(payloads) == 3
    assert {payload.metadata["encoding"] for payload in payloads} == {MARKED}


def test_an_sdk_whose_passes_changed_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    async def decode_activation(activation: Any, data_converter: Any, new_option: bool) -> None:
        """A later SDK's function with other parameters."""

    monkeypatch.setattr(bridge_worker, "decode_activation", decode_activation)
    monkeypatch.setattr(payload_passes, "_ORIGINALS", {})
    assert not payload_passes.install()
    assert bridge_worker.decode_activation is decode_activation
    assert not payload_passes.installed()
