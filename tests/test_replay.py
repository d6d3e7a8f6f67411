"""Recorded histories replay against the current workflow code; a changed workflow is caught as nondeterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from schemas.turn import CompanionState, IncomingMessage, TurnReply
from workflows.companion import CompanionWorkflow

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def _history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def test_the_recorded_histories_are_committed() -> None:
    assert [path.stem for path in HISTORIES] == ["continued_as_new", "limits", "nudges", "own_nudges",
                                                 "plain_conversation", "remember", "remember_when_quiet",
                                                 "retried_activities", "telegram"]


@pytest.mark.parametrize("sandbox", [True, False], ids=["sandboxed", "unsandboxed"])
@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem for path in HISTORIES])
async def test_every_committed_history_replays(path: Path, sandbox: bool) -> None:
    # Both of the worker's runners (WORKFLOW_SANDBOX): a user's workflow moves between workers of either kind.
    # (Imported here: this module's own workflow is imported again in the sandbox, which refuses the worker's.)
    from worker import UNSANDBOXED_RUNNER, WORKFLOW_RUNNER

    replayer = Replayer(workflows=[CompanionWorkflow], data_converter=pydantic_data_converter,
                        workflow_runner=WORKFLOW_RUNNER if sandbox else UNSANDBOXED_RUNNER)
    await replayer.replay_workflow(_history(path))


@workflow.defn(name="CompanionWorkflow")
class ReorderedWorkflow(CompanionWorkflow):
    """The companion with one change nobody versioned: it pauses before asking the LLM."""

    @workflow.init
    def __init__(self, state: CompanionState) -> None:
        super().__init__(state)

    @workflow.run
    async def run(self, state: CompanionState) -> None:
        await super().run(state)

    @workflow.update(name="send")
    async def send(self, message: IncomingMessage) -> TurnReply:
        return await super().send(message)

    async def _generate(self, user_id, message, note):  # type: ignore[no-untyped-def]
        await workflow.sleep(1)
        return await super()._generate(user_id, message, note)


async def test_a_changed_workflow_fails_replay_with_a_nondeterminism_error() -> None:
    replayer = Replayer(workflows=[ReorderedWorkflow], data_converter=pydantic_data_converter)
    with pytest.raises(NondeterminismError):
        await replayer.replay_workflow(_history(Path(__file__).parent / "histories" / "plain_conversation.json"))


def test_companion_replay_reports_each_file(tmp_path: Path) -> None:
    history = json.loads((Path(__file__).parent / "histories" / "plain_conversation.json").read_text())
    scheduled = next(event for event in history["events"]
                     if event["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_SCHEDULED")
    scheduled["activityTaskScheduledEventAttributes"]["activityType"]["name"] = "no_such_step"  # not what the code does
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(history))
    done = subprocess.run([sys.executable, "-m", "cli", "replay", *map(str, HISTORIES)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == f"{len(HISTORIES)} replayed, 0 failed"
    done = subprocess.run([sys.executable, "-m", "cli", "replay", str(HISTORIES[0]), str(broken)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and done.stdout.splitlines()[-1] == "1 replayed, 1 failed"
