"""Worker Versioning on the dev server: a conversation is pinned to the build it runs on and moves to the current
build at its next message, with everything it carries; a worker's build id follows the workflow's code."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.api.enums.v1 import VersioningBehavior
from temporalio.client import WorkflowHandle
from temporalio.common import WorkerDeploymentVersion

import worker
from activities.companion import CompanionActivities
from core.settings import Settings, load_settings
from schemas.turn import ChatUser, Nudge, TimezoneChange, TimezoneSource
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from tests.conftest import OPENAI_TEST_KEY, SharedDevServer, Stack, chat_model, new_telegram_id
from tests.fake_openai import FakeOpenAI
from tests.test_workflow import eventually, replies_by_key
from worker import CODE_FOLDERS, build_worker, code_build_id, deployment_version, make_current
from workflows import contract
from workflows.client import set_timezone
from workflows.companion import CompanionWorkflow


async def build_of(handle: WorkflowHandle) -> tuple[str, int]:
    """The build a conversation's run is pinned to, and its versioning behavior."""
    info = (await handle.describe()).raw_description.workflow_execution_info.versioning_info
    return info.deployment_version.build_id, info.behavior


def two_builds() -> tuple[WorkerDeploymentVersion, WorkerDeploymentVersion]:
    """Builds A and B of a deployment of the test's own."""
    deployment = f"companion-test-{uuid.uuid4().hex[:8]}"
    a, b = (WorkerDeploymentVersion(deployment_name=deployment, build_id=build) for build in ("build-a", "build-b"))
    return a, b


def settings_of_a_test(checkin_after_days: int) -> Settings:
    """Settings on a task queue of the test's own, remembering after every turn."""
    return load_settings(temporal_task_queue=f"test-{uuid.uuid4()}", checkin_after_days=checkin_after_days,
                         remember_after_quiet_seconds=0, openai_api_key=OPENAI_TEST_KEY)


async def test_a_conversation_moves_to_the_new_current_build_at_its_next_message(
        dev_server: SharedDevServer, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex) -> None:
    env = await dev_server.get()
    a, b = two_builds()
    stack = Stack(env.client, settings_of_a_test(checkin_after_days=3), repo, fake_llm, env, memory)
    settings = stack.settings
    simon = new_telegram_id()
    handle = stack.handle(simon)
    activities = CompanionActivities.create(repo, chat_model(fake_llm), memory=memory)
    async with contextlib.AsyncExitStack() as workers:
        worker_a = await workers.enter_async_context(build_worker(env.client, settings.temporal_task_queue,
                                                                  activities, version=a))
        assert await make_current(env.client, a)
        await stack.say(simon, "I have a job interview tomorrow")  # a follow-up nudge and a check-in
        await handle.execute_update(CompanionWorkflow.schedule_nudge, Nudge(
            nudge_id="tea", at=datetime.now(UTC) + timedelta(days=1), text="Tea time?"))
        before = await stack.state(simon)
        assert await build_of(handle) == ("build-a", VersioningBehavior.VERSIONING_BEHAVIOR_PINNED)
        first_run = (await handle.describe()).run_id

        async with build_worker(env.client, settings.temporal_task_queue, activities, version=b):
            assert await make_current(env.client, b)
            assert await build_of(handle) == ("build-a", VersioningBehavior.VERSIONING_BEHAVIOR_PINNED)  # idle
            await stack.signal(stack.message(simon, "I'm nervous", key=f"tg:{simon}:2"))
            after = await eventually(lambda: stack.state(simon), lambda state: state.turns == 2)
            assert (await handle.describe()).run_id != first_run
            assert await build_of(handle) == ("build-b", VersioningBehavior.VERSIONING_BEHAVIOR_PINNED)
            # The new run on build B answered it, with what the conversation carried.
            assert {nudge.nudge_id for nudge in after.nudges} == {nudge.nudge_id for nudge in before.nudges}
            assert len(after.nudges) == 3 and after.user_id == before.user_id and after.seen_keys[:1] == [
                before.seen_keys[0]]
            assert after.transcript[:2] == before.transcript
            await workers.aclose()  # build A's worker stops
            assert worker_a.workers[0].is_shutdown
            assert (await stack.say(simon, "Still there?")).text == "I hear you: Still there?"
            assert await build_of(handle) == ("build-b", VersioningBehavior.VERSIONING_BEHAVIOR_PINNED)
            prompt = fake_llm.requests[1]["messages"]
            assert [m["content"] for m in prompt[1:3]] == ["I have a job interview tomorrow",
                                                           "I hear you: I have a job interview tomorrow"]
        # nothing lost, nothing answered twice
        assert len(fake_llm.requests) == 3
        assert sorted((await replies_by_key(stack, simon)).values()) == [
            "I hear you: I have a job interview tomorrow", "I hear you: I'm nervous", "I hear you: Still there?"]
    await handle.terminate("test finished")


def test_the_build_id_follows_the_workflow_code(tmp_path: Path) -> None:
    copies = []
    for folder in CODE_FOLDERS:
        copies.append(tmp_path / folder.name)
        shutil.copytree(folder, copies[-1], ignore=shutil.ignore_patterns("__pycache__"))
    assert code_build_id(copies) == code_build_id() and len(code_build_id()) == 12
    workflow = tmp_path / "workflows" / "companion.py"
    workflow.write_text(workflow.read_text().replace("MAX_QUEUED = 100", "MAX_QUEUED = 101"))
    assert code_build_id(copies) != code_build_id()  # a changed workflow is a new build by itself

    assert deployment_version(load_settings()) == WorkerDeploymentVersion("companion", code_build_id())
    assert deployment_version(load_settings(companion_build_id="v2-test")).build_id == "v2-test"


def _before_timezones() -> type:
    """CompanionWorkflow as a build from before the set_timezone update had it: the same class without it."""
    members = {name: value for name, value in vars(CompanionWorkflow).items()
               if name not in ("set_timezone", "__dict__", "__weakref__") and not name.startswith("__temporal")}
    # Named as the original: temporalio checks that the run method is defined on the class of that name.
    return workflow.defn(name=contract.WORKFLOW_TYPE)(type("CompanionWorkflow", (), members))


async def test_an_update_a_conversations_build_lacks_moves_it_to_the_current_build_first(
        dev_server: SharedDevServer, repo: MemoryRepository, fake_llm: FakeOpenAI, memory: MemoryIndex,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = await dev_server.get()
    a, b = two_builds()
    stack = Stack(env.client, settings_of_a_test(checkin_after_days=0), repo, fake_llm, env, memory)
    settings = stack.settings
    simon = new_telegram_id()
    activities = CompanionActivities.create(repo, chat_model(fake_llm), memory=memory)
    with monkeypatch.context() as patch:
        patch.setattr(worker, "CompanionWorkflow", _before_timezones())
        old = build_worker(env.client, settings.temporal_task_queue, activities, version=a, sandbox=False)
    async with old:
        assert await make_current(env.client, a)
        await stack.say(simon, "remind me tomorrow at 9 to call mom")
        async with build_worker(env.client, settings.temporal_task_queue, activities, version=b):
            assert await make_current(env.client, b)
            assert (await build_of(stack.handle(simon)))[0] == "build-a"  # idle since the deploy
            changed = await set_timezone(env.client, settings, ChatUser(telegram_id=simon),
                                         TimezoneChange(zone="Asia/Tokyo", source=TimezoneSource.OPERATOR))
            assert changed.previous == "UTC" and [n.text for n in changed.moved] == ["⏰ Reminder: call mom"]
            assert (await build_of(stack.handle(simon)))[0] == "build-b"
            assert (await stack.state(simon)).nudges == changed.moved
    await stack.handle(simon).terminate("test finished")
