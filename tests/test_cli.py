"""The command line as a user runs it: `companion dev`, `say`, `history`, and what happens when nothing runs."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from cli.nudges import parse_when
from cli.reaper import alive
from core.errors import InvalidInputError
from tests.fake_openai import FakeOpenAI
from tests.fake_telegram import TOKEN, FakeBotAPI, message_update
from tests.local_http import free_port, serve
from tests.test_embedded import _postgres_processes


def _free_port_pair() -> int:
    """A port P with P + 1000 free too (the dev server's UI goes there)."""
    return free_port(leaving=1000)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update({"HOME": str(tmp_path), **extra})
    return env


def _companion(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_say_with_nothing_running_explains_and_fails(tmp_path: Path) -> None:
    port = _free_port_pair()
    done = _companion("say", "--user", "42", "hello", cwd=tmp_path,
                      env=_env(tmp_path, TEMPORAL_ADDRESS=f"localhost:{port}"))
    assert done.returncode == 1
    assert done.stderr.strip() == (f"companion: nothing is running at localhost:{port}: start the companion with "
                                   "`uv run companion dev`")


def test_help_and_say_start_without_the_libraries_of_the_worker(tmp_path: Path) -> None:
    # The worker's libraries (the LLM and Telegram clients, SQLAlchemy and Alembic) take seconds to import; `companion
    # --help` and `companion say` start in well under a second because they load none of them.
    heavy = ["openai", "telegram", "sqlalchemy", "alembic", "numpy", "activities", "workflows.companion"]
    probe = ("import sys\n"
             "from cli import conversation, main\n"
             "main._build_parser()\n"
             f"print([name for name in {heavy!r} if name in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_client_speaks_the_names_the_workflow_declares() -> None:
    from temporalio import workflow

    from workflows import contract
    from workflows.companion import CompanionWorkflow

    definition = workflow._Definition.must_from_class(CompanionWorkflow)
    assert definition.name == contract.WORKFLOW_TYPE
    assert set(definition.signals) == {contract.MESSAGE, contract.WAKE}
    assert set(definition.queries) == {contract.STATE, contract.NUDGES}
    assert set(definition.updates) == {contract.SEND, contract.SCHEDULE_NUDGE, contract.CANCEL_NUDGE,
                                       contract.SET_CHECKINS, contract.SET_TIMEZONE, contract.MEMORY,
                                       contract.FORGET_ITEM, contract.EXPORT, contract.PERSONA, contract.FORGET,
                                       contract.USAGE}


class DevProcess:
    """`companion dev --no-chat` in the background, stopped with SIGTERM."""

    def __init__(self, cwd: Path, env: dict[str, str], *args: str):
        self.cwd, self.env = cwd, env
        self.output = cwd / "dev.out"
        with self.output.open("w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "cli", "dev", "--no-chat", *args], cwd=cwd,
                                            env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while "Press Ctrl-C" not in self.output.read_text():
            assert self.process.poll() is None, self.output.read_text()
            assert time.monotonic() < deadline, self.output.read_text()
            time.sleep(0.2)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def tail(self) -> str:
        """The end of what it printed and of its log, for a failed assertion."""
        log = self.cwd / ".companion" / "companion.log"
        return (self.output.read_text(errors="replace")[-3000:] + "\n--- companion.log ---\n"
                + (log.read_text(errors="replace")[-5000:] if log.exists() else "(none)"))


def _a_second_worker_stops_gracefully_on_sigterm(cwd: Path, env: dict[str, str]) -> None:
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=cwd, env={**env, "LOG_FORMAT": "json"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert worker.stderr is not None
    for line in worker.stderr:  # wait until it polls, then ask it to stop
        if '"worker.started"' in line:
            break
    worker.send_signal(signal.SIGTERM)
    rest = worker.stderr.read()
    assert worker.wait(30) == 0
    assert '"worker.stopped"' in rest


@pytest.fixture
def dev_llm() -> Iterator[FakeOpenAI]:
    """The LLM `companion dev` is pointed at (dev_env)."""
    llm = FakeOpenAI()
    llm.start()
    yield llm
    llm.stop()


@pytest.fixture
def dev_env(tmp_path: Path, dev_llm: FakeOpenAI) -> dict[str, str]:
    # No quiet hours: "in 3s" must arrive in 3 s whatever the hour the tests run at.
    return _env(tmp_path, TEMPORAL_ADDRESS=f"localhost:{_free_port_pair()}", OPENAI_BASE_URL=dev_llm.url,
                OPENAI_API_KEY="test-key", NUDGE_QUIET_HOURS="off")


def test_companion_dev_runs_answers_stops_cleanly_and_keeps_conversations(tmp_path: Path,
                                                                          dev_env: dict[str, str]) -> None:
    # Tried offline first: the offline embedder, memories made a second after each turn.
    offline = {**dev_env, "EMBEDDING_PROVIDER": "local", "REMEMBER_AFTER_QUIET_SECONDS": "1"}
    dev = DevProcess(tmp_path, offline)
    try:
        started = dev.output.read_text()
        # Each service as it is ready, then the banner: the prompt (or the banner) only once a turn can be answered.
        assert [line.split()[0] for line in started.splitlines()[1:5]] == ["Temporal", "PostgreSQL", "LLM", "worker"]
        port = int(dev_env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1])
        assert f"Temporal UI  http://localhost:{port + 1000}" in started
        said = _companion("say", "--user", "42", "Hi, I'm Simon", cwd=tmp_path, env=offline)
        assert (said.returncode, said.stdout, said.stderr) == (0, "I hear you: Hi, I'm Simon\n", "")
        # LLM settings given to a client command are the worker's: the reply says which model wrote it.
        other = _companion("say", "--user", "43", "hello", cwd=tmp_path,
                           env={**offline, "OPENAI_CHAT_MODEL": "llama3.2"})
        assert other.stdout == "I hear you: hello\n" and other.stderr == (
            "companion: note: gpt-4o-mini, the running worker's LLM, wrote this reply: OPENAI_API_KEY, "
            "OPENAI_BASE_URL, OPENAI_CHAT_MODEL given to `companion say` are read by the worker only\n")
        described = _described(dev_env, "companion-user-42")
        info = described["workflowExecutionInfo"]
        assert info["status"] == "WORKFLOW_EXECUTION_STATUS_RUNNING"
        assert info["type"]["name"] == "CompanionWorkflow"
        summary = described["executionConfig"]["userMetadata"]["summary"]  # the UI's Summary
        assert summary == "Conversation with user 42 (Telegram id 42)"
        _a_second_worker_stops_gracefully_on_sigterm(tmp_path, offline)
        deadline = time.monotonic() + 60
        # Both messages remembered: the two stretches (the message, then it and the reply) found as one.
        while not all("I hear you" in (found := _companion("memory", "search", "--user", user, query, cwd=tmp_path,
                                                           env=offline).stdout)
                      for user, query in (("43", "hello"), ("42", "Simon"))):
            assert time.monotonic() < deadline, dev.tail()
            time.sleep(1)
        # A line per memory: score, when (the user's time), kind, how it was found, its text.
        assert re.match(r"\d\.\d{3}  \d{4}-\d\d-\d\d \d\d:\d\d  conversation +vector\+keyword +.*Simon",
                        found.splitlines()[0]), found
        assert "Hi, I'm Simon / Companion: I hear you" in " ".join(found.split())  # two messages, one hit
        assert found.splitlines()[-1].startswith("1 found in "), found
    finally:
        assert dev.stop() == 0, dev.tail()
    data_dir = tmp_path / ".companion"
    assert _postgres_processes(data_dir) == []
    assert not (data_dir / "postgres" / "postmaster.pid").exists()

    history = _companion("history", "--user", "42", cwd=tmp_path, env=dev_env)
    assert history.returncode == 0
    lines = history.stdout.splitlines()
    assert [line.split(None, 3)[2:] for line in lines] == [["user", "42    Hi, I'm Simon"],
                                                          ["companion", "I hear you: Hi, I'm Simon"]]

    # What /export would hand Simon: the conversation, its memories (without vectors), and the transcript.
    out = tmp_path / "export"
    exported = _companion("export", "--user", "42", "--out", str(out), cwd=tmp_path, env=dev_env)
    assert exported.returncode == 0, exported.stderr
    data = json.loads((out / "companion-export-42.json").read_text())
    assert [m["content"] for m in data["tables"]["conversations"]] == ["Hi, I'm Simon", "I hear you: Hi, I'm Simon"]
    assert len(data["tables"]["memories"]) == 2
    assert not {"embedding", "word_vectors"} & set(data["tables"]["memories"][0])
    transcript = (out / "companion-conversation-42.md").read_text()
    assert re.search(r"\*\*\d\d:\d\d user 42:\*\* Hi, I'm Simon", transcript), transcript

    # With an OpenAI key the embedder changes: start-up stops with one line saying both ways on...
    refused = _companion("dev", "--no-chat", cwd=tmp_path, env=dev_env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    [line] = refused.stderr.splitlines()
    assert "embedded in 384 dimensions, but the configured embedder makes 1536" in line
    assert "`companion dev --reindex`" in line and "EMBEDDING_PROVIDER=local" in line
    dev = DevProcess(tmp_path, dev_env, "--reindex")  # ...and --reindex takes one: a restart keeps everything
    try:
        assert "4 memories embedded again" in dev.output.read_text()  # both users' turns, and the replies
        said = _companion("say", "--user", "42", "It's me again", cwd=tmp_path, env=dev_env)
        assert said.stdout == "I hear you: It's me again\n", said.stderr
    finally:
        assert dev.stop() == 0, dev.tail()
    assert len(_companion("history", "--user", "42", cwd=tmp_path, env=dev_env).stdout.splitlines()) == 4


class PtyDev:
    """`companion dev` with its chat on a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, cwd: Path, env: dict[str, str]):
        self.cwd = cwd
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become `companion dev` on the terminal
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "cli", "dev"], env)
        self.screen = ""

    def read_until(self, text: str, timeout: float = 90) -> str:
        """Everything shown so far, once ``text`` is among it."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert time.monotonic() < deadline, f"{text!r} never appeared:\n{self.screen[-3000:]}"
            if select.select([self.fd], [], [], 0.2)[0]:
                try:
                    self.screen += os.read(self.fd, 4096).decode(errors="replace")
                except OSError:  # the terminal closed: the process ended
                    break
        return self.screen

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def close(self) -> int:
        """Ctrl-D at the prompt: the chat ends and companion dev stops everything; its exit status."""
        os.write(self.fd, b"\x04")
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                if select.select([self.fd], [], [], 0.2)[0]:
                    self.screen += os.read(self.fd, 4096).decode(errors="replace")


def test_the_chat_of_companion_dev_shows_the_conversation_only(tmp_path: Path, dev_env: dict[str, str],
                                                               dev_llm: FakeOpenAI) -> None:
    dev = PtyDev(tmp_path, dev_env)
    try:
        started = dev.read_until("you> ")
        # The prompt opens once the worker answers: every service said it was ready first, and the worker polls.
        assert started.index("  worker ") < started.index("companion is running") < started.index("you> ")
        assert "worker.started" in (tmp_path / ".companion" / "companion.log").read_text()

        dev.type("Hi, I'm Simon")
        shown = dev.read_until("companion> I hear you: Hi, I'm Simon")
        # While the reply is awaited, a thinking line, erased when the reply comes.
        assert "companion is thinking…\r\x1b[Kcompanion> I hear you: Hi, I'm Simon" in shown

        # A reply that takes its time shows as it is written, and ends up whole, once.
        dev_llm.tokens_per_s = 4.0  # 3 s of writing
        words = "one two three four five six seven eight nine ten"
        dev.type(words)
        growing = dev.read_until("companion> I hear", timeout=30)
        assert f"I hear you: {words}" not in growing
        shown = dev.read_until(f"I hear you: {words}\r\nyou> ", timeout=30)
        assert shown.count(f"I hear you: {words}") == 1 and "companion is thinking…\r\x1b[Kcompanion> I hear" in shown
        dev_llm.tokens_per_s = 0.0

        scheduled = _companion("nudges", "schedule", "--user", "42", "--in", "2s", "--text", "drink water",
                               cwd=tmp_path, env=dev_env)
        assert scheduled.returncode == 0, scheduled.stderr
        # The nudge appears in the open chat, the prompt again below it.
        dev.read_until("you> \r\x1b[Kcompanion> drink water\r\nyou> ", timeout=30)
    finally:
        status = dev.close()
    assert status == 0, dev.screen[-3000:]
    # Nothing but the conversation: no log line of the companion, its libraries or Temporal reached the terminal.
    for marker in ("WARN", "INFO", "ERROR", "Traceback", '{"', "TMPRL"):
        assert marker not in dev.screen, dev.screen


def test_a_busy_port_gets_a_clear_message(tmp_path: Path, dev_env: dict[str, str]) -> None:
    port = int(dev_env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = _companion("dev", "--no-chat", cwd=tmp_path, env=dev_env)
    assert done.returncode == 1
    assert f"port {port} (TEMPORAL_ADDRESS) is already in use" in done.stderr


def test_an_unreachable_database_url_stops_companion_dev_with_one_line(tmp_path: Path,
                                                                       dev_env: dict[str, str]) -> None:
    closed = free_port()
    done = _companion("dev", "--no-chat", cwd=tmp_path,
                      env={**dev_env, "DATABASE_URL": f"postgresql://companion:secret@127.0.0.1:{closed}/companion"})
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "  PostgreSQL  failed"
    [line] = done.stderr.splitlines()
    assert line.startswith("companion: cannot use PostgreSQL (DATABASE_URL): ") and "correct DATABASE_URL" in line
    assert "secret" not in done.stdout + done.stderr


def test_operators_schedule_list_and_cancel_nudges_against_companion_dev(tmp_path: Path,
                                                                        dev_env: dict[str, str]) -> None:
    dev = DevProcess(tmp_path, dev_env)
    try:
        scheduled = _companion("nudges", "schedule", "--user", "42", "--in", "3s", "--text", "drink water",
                               cwd=tmp_path, env=dev_env)
        assert scheduled.returncode == 0, scheduled.stderr
        assert re.fullmatch(r"op-\w+  due \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in [23] s\)\n", scheduled.stdout)
        nudge_id = scheduled.stdout.split()[0]
        deadline = time.monotonic() + 30
        while "drink water" not in _companion("history", "--user", "42", cwd=tmp_path, env=dev_env).stdout:
            assert time.monotonic() < deadline, "the nudge never arrived"
            time.sleep(0.5)
        header, row = _companion("nudges", "list", "--user", "42", cwd=tmp_path, env=dev_env).stdout.splitlines()
        assert header.split() == ["ID", "USER", "STATUS", "DUE", "(user's", "time)", "BY", "WHAT"]
        assert row.split()[:3] == [nudge_id, "42", "sent"] and row.endswith("drink water")
        assert [header.index(title) for title in ("USER", "STATUS", "BY", "WHAT")] == [  # aligned columns
            row.index(cell) + 1 for cell in (" 42 ", " sent ", " operator ", " drink water")]

        later = _companion("nudges", "schedule", "--user", "42", "--in", "1h", "--text", "stretch", cwd=tmp_path,
                           env=dev_env).stdout.split()[0]
        assert _companion("nudges", "cancel", "--user", "42", later, cwd=tmp_path, env=dev_env).stdout == \
            f"cancelled {later}\n"
        again = _companion("nudges", "cancel", "--user", "42", later, cwd=tmp_path, env=dev_env)
        assert again.returncode == 1 and "was sent or cancelled already" in again.stderr
        unknown = _companion("nudges", "cancel", "--user", "42", "nope", cwd=tmp_path, env=dev_env)
        assert unknown.returncode == 1 and "this user has no nudge nope" in unknown.stderr

        # the same update from the Temporal CLI, as an operator without our CLI would do it
        third = _companion("nudges", "schedule", "--user", "42", "--at", "2099-01-01T09:00+00:00", "--purpose",
                           "ask about the new year", cwd=tmp_path, env=dev_env).stdout.split()[0]
        via_temporal = subprocess.run(
            [str(Path(sys.executable).parent / "temporal"), "workflow", "update", "execute", "--address",
             dev_env["TEMPORAL_ADDRESS"], "--workflow-id", "companion-user-42", "--name", "cancel_nudge",
             "--input", json.dumps(third)], capture_output=True, text=True, timeout=30)
        assert via_temporal.returncode == 0, via_temporal.stderr
        statuses = {line.split()[0]: line.split()[2] for line in
                    _companion("nudges", "list", cwd=tmp_path, env=dev_env).stdout.splitlines()[1:]}
        assert statuses == {nudge_id: "sent", later: "cancelled", third: "cancelled"}

        # The user's time zone, set through their workflow as /timezone sets it.
        zoned = _companion("users", "set", "--user", "42", "--timezone", "paris", cwd=tmp_path, env=dev_env)
        assert zoned.returncode == 0, zoned.stderr
        assert re.fullmatch(r"user 42: time zone Europe/Paris \(was UTC; \d\d:\d\d there now\)\n", zoned.stdout)
        *_, row = _companion("nudges", "list", "--user", "42", cwd=tmp_path, env=dev_env).stdout.splitlines()
        assert re.search(r" CES?T ", row)  # times shown in the user's zone now

        # What the user sees with /memory, as an operator reads it.
        _companion("nudges", "schedule", "--user", "42", "--in", "2h", "--text", "hydrate", cwd=tmp_path, env=dev_env)
        listed = _companion("memory", "list", "--user", "42", cwd=tmp_path, env=dev_env)
        assert listed.returncode == 0, listed.stderr
        assert re.match(r"What I remember of you:\n\nMessages I plan to send you\n1\. \w{3} \d\d \w{3} \d{4}, "
                        r"\d\d:\d\d: hydrate\n    learned ", listed.stdout)
        nobody = _companion("memory", "list", "--user", "43", cwd=tmp_path, env=dev_env)
        assert nobody.returncode == 0 and nobody.stdout == "nothing remembered: user 43 is unknown\n"

        # Everything kept of the user, as /export sends it to them.
        exported = _companion("export", "--user", "42", "--out", str(tmp_path / "out"), cwd=tmp_path, env=dev_env)
        assert exported.returncode == 0, exported.stderr
        data = json.loads((tmp_path / "out" / "companion-export-42.json").read_text())
        assert data["user"]["timezone"] == "Europe/Paris"
        assert sorted(n["content"] or n["purpose"] for n in data["tables"]["scheduled_messages"]) == [
            "ask about the new year", "drink water", "hydrate", "stretch"]
        assert (tmp_path / "out" / "companion-conversation-42.md").read_text().startswith("# Your conversation")
    finally:
        assert dev.stop() == 0, dev.tail()


@pytest.mark.parametrize(("after", "expected"), [("3s", timedelta(seconds=3)), ("90m", timedelta(minutes=90)),
                                                 ("1d12h", timedelta(days=1, hours=12))])
def test_nudge_durations(after: str, expected: timedelta) -> None:
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    assert parse_when(None, after, now) == now + expected


@pytest.mark.parametrize(("at", "after", "message"), [(None, "soon", "expected a duration"),
                                                      (None, "2x", "expected a duration"),
                                                      ("tomorrow", None, "expected an ISO time"),
                                                      ("2026-11-25T09:00", None, "give its UTC offset")])
def test_bad_nudge_times_are_refused(at: str | None, after: str | None, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_when(at, after, datetime(2026, 11, 24, tzinfo=UTC))


async def test_companion_dev_with_a_bot_token_talks_on_telegram(tmp_path: Path, dev_env: dict[str, str]) -> None:
    api = FakeBotAPI()
    api.start()
    env = {**dev_env, "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": api.url}
    dev = await asyncio.to_thread(DevProcess, tmp_path, env)
    try:
        assert "Telegram     gateway on, long polling" in dev.output.read_text()
        api.push(message_update(777, "hello from Telegram"))
        [reply] = await api.wait_for(777, timeout=60)
        assert reply.text == "I hear you: hello from Telegram"
    finally:
        assert await asyncio.to_thread(dev.stop) == 0
        api.stop()
    history = _companion("history", "--user", "777", cwd=tmp_path, env=env).stdout.splitlines()
    assert [line.split(None, 3)[2:] for line in history] == [["Ada", "hello from Telegram"],
                                                            ["companion", "I hear you: hello from Telegram"]]


# Headless Chromium on this machine: no sandbox (root), none of the background connections a closed network refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_with_payload_keys_the_ui_of_companion_dev_decodes_the_conversation_through_its_codec_server(
        tmp_path: Path, dev_env: dict[str, str]) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's package)")
    from playwright.sync_api import sync_playwright

    from core.codec import new_key_line

    env = {**dev_env, "PAYLOAD_KEYS": new_key_line()}
    ui = int(env["TEMPORAL_ADDRESS"].rsplit(":", 1)[1]) + 1000
    dev = DevProcess(tmp_path, env)
    try:
        assert f"Codec server http://localhost:{ui + 1}" in dev.output.read_text()
        said = _companion("say", "--user", "42", "my secret garden is behind the old mill", cwd=tmp_path, env=env)
        assert said.returncode == 0, said.stderr
        shown = _companion("history", "--user", "42", cwd=tmp_path, env=env)  # PostgreSQL keeps it readable
        assert "my secret garden" in shown.stdout
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://localhost:{ui}/namespaces/default/workflows/companion-user-42", timeout=60_000)
            # The workflow's input, encrypted in Temporal, shown decoded: the UI asked the codec server.
            page.get_by_text('"telegram_id": 42').first.wait_for(timeout=60_000)
            browser.close()
    finally:
        assert dev.stop() == 0, dev.tail()
    log = (tmp_path / ".companion" / "companion.log").read_text()
    served = [line for line in log.splitlines() if "codec_server.served" in line]
    assert served and all("path=/decode" in line or '"/decode"' in line for line in served)


def test_doctor_passes_against_companion_dev_and_says_what_to_fix_when_it_is_gone(
        tmp_path: Path, dev_env: dict[str, str]) -> None:
    dev = DevProcess(tmp_path, dev_env)
    try:
        healthy = _companion("doctor", cwd=tmp_path, env=dev_env)
    finally:
        assert dev.stop() == 0, dev.tail()
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    checks = {line.split()[0]: line.split()[1] for line in healthy.stdout.splitlines()[:-1]}
    assert checks == {"Temporal": "ok", "PostgreSQL": "ok", "schema": "ok", "pgvector": "ok", "LLM": "ok",
                      "Transcription": "ok", "Vision": "ok", "Embedder": "ok"}

    stopped = _companion("doctor", cwd=tmp_path, env=dev_env)  # PostgreSQL and Temporal are gone with `dev`
    assert stopped.returncode == 1
    lines = stopped.stdout.splitlines()
    assert re.search(r"^PostgreSQL +FAIL +the embedded server is not running", stopped.stdout, re.MULTILINE)
    assert "fix: start `uv run companion dev` (it runs the embedded PostgreSQL), or set DATABASE_URL" in stopped.stdout
    assert re.search(r"^Temporal +FAIL +nothing answers at", stopped.stdout, re.MULTILINE)
    assert lines[-1] == "4 ok, 2 failed"  # the LLM stub still answers, transcribes and sees, embeddings too

    unreachable = _companion("doctor", cwd=tmp_path, env={
        **dev_env, "DATABASE_URL": "postgresql://companion:pw@127.0.0.1:9/companion"})  # nothing listens on 9
    assert unreachable.returncode == 1
    assert re.search(r"^PostgreSQL +FAIL +cannot connect \(DATABASE_URL\)", unreachable.stdout, re.MULTILINE)


def test_the_worker_serves_metrics_and_its_log_lines_lead_to_the_workflow(tmp_path: Path,
                                                                        dev_env: dict[str, str]) -> None:
    metrics_port = free_port()
    env = {**dev_env, "METRICS_ADDRESS": f"127.0.0.1:{metrics_port}"}
    dev = DevProcess(tmp_path, env)
    try:
        for text in ("hello", "remind me in 2 hours to stretch"):
            said = _companion("say", "--user", "42", text, cwd=tmp_path, env=env)
            assert said.returncode == 0, said.stderr
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        assert dev.stop() == 0, dev.tail()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line and not line.startswith("#")}

    def total(name: str, **labels: str) -> float:
        return sum(value for key, value in samples.items() if key.split("{")[0] == name
                   and all(f'{label}="{wanted}"' in key for label, wanted in labels.items()))

    assert total("companion_turns", channel="console") == 2
    assert total("companion_llm_calls", outcome="ok", purpose="reply") == 2
    assert total("companion_llm_tokens", kind="completion") > 0
    assert total("companion_llm_latency_count", purpose="reply") == 2
    assert total("temporal_local_activity_execution_latency_count", activity_type="prepare_turn") == 2  # the SDK's own
    assert total("temporal_activity_execution_latency_count", activity_type="generate_reply") == 2

    log = [json.loads(line) for line in (tmp_path / ".companion" / "companion.log").read_text().splitlines()]
    request = next(line for line in log if line["event"] == "llm.request")
    assert request["workflow_id"] == "companion-user-42" and request["activity"] == "generate_reply"
    assert request["run_id"] and request["activity_id"] and request["attempt"] == 1


def test_the_worker_sends_traces_of_turns_to_an_otlp_collector(tmp_path: Path, dev_env: dict[str, str]) -> None:
    spans: list[str] = []

    def collect(request: BaseHTTPRequestHandler) -> None:  # an OTLP/HTTP collector: protobuf in, empty 200 out
        body = request.rfile.read(int(request.headers["Content-Length"]))
        export = ExportTraceServiceRequest.FromString(body)
        spans.extend(span.name for resource in export.resource_spans for scope in resource.scope_spans
                     for span in scope.spans)
        request.send_response(200)
        request.send_header("Content-Type", "application/x-protobuf")
        request.send_header("Content-Length", "0")
        request.end_headers()

    collector = serve(collect)
    host, port = collector.server_address[:2]
    env = {**dev_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{host}:{port}"}
    dev = DevProcess(tmp_path, env)
    try:
        said = _companion("say", "--user", "42", "trace me", cwd=tmp_path, env=env)
        assert said.returncode == 0, said.stderr
    finally:
        assert dev.stop() == 0, dev.tail()  # the worker flushes its spans on the way out
        collector.shutdown()
    assert {"RunActivity:prepare_turn", "RunActivity:generate_reply"} <= set(spans)


def test_the_code_kept_of_a_build_is_what_the_wheel_holds() -> None:
    import tomllib

    from cli.builds import SOURCES

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(SOURCES) == set(pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"])


def test_the_reaper_stops_what_it_watches_and_leaves_what_ended_meanwhile() -> None:
    # A process `companion dev` said had ended ("PID 0") is not signalled: its pid may be another process's by then.
    kept, stopped = (subprocess.Popen(["sleep", "60"]) for _ in range(2))
    reaper = subprocess.Popen([sys.executable, "-m", "cli.reaper"], stdin=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[1])
    try:
        reaper.communicate(f"{kept.pid} 15\n{stopped.pid} 15\n{kept.pid} 0\n", timeout=30)
        assert reaper.returncode == 0
        assert stopped.wait(5) == -signal.SIGTERM
        assert kept.poll() is None
    finally:
        kept.kill()
        stopped.kill()


def test_companion_dev_killed_with_sigkill_leaves_nothing_running(tmp_path: Path, dev_env: dict[str, str]) -> None:
    dev = DevProcess(tmp_path, dev_env)
    log = [json.loads(line) for line in (tmp_path / ".companion" / "companion.log").read_text().splitlines()]
    temporal = next(line["pid"] for line in log if line["event"] == "temporal.dev_server_started")
    postgres = int((tmp_path / ".companion" / "postgres" / "postmaster.pid").read_text().split()[0])
    assert alive(temporal) and alive(postgres)

    dev.process.kill()  # SIGKILL: no handler of its own runs
    dev.process.wait(10)
    deadline = time.monotonic() + 5
    while (alive(temporal) or alive(postgres)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(temporal) and not alive(postgres), dev.tail()

    again = DevProcess(tmp_path, dev_env)  # the ports and the data are free again, and the data is whole
    try:
        said = _companion("say", "--user", "42", "hello again", cwd=tmp_path, env=dev_env)
        assert said.returncode == 0 and "I hear you: hello again" in said.stdout, said.stdout + said.stderr
    finally:
        assert again.stop() == 0, again.tail()


def test_companion_dev_starts_on_a_temporal_that_reports_its_routing_update_in_progress_for_good(
        tmp_path: Path, dev_env: dict[str, str]) -> None:
    # The data of a `companion dev` whose Temporal (server 1.32) reports the routing of its build, cf82659c1a5a, "in
    # progress" for good: the build's "propagation complete" reached the deployment's workflow as it continued as new,
    # and was dropped. Every later start then waited on the report and failed after 60 s.
    data = tmp_path / ".companion"
    data.mkdir()
    stuck = Path(__file__).parent / "data" / "temporal_routing_update_stuck.db.gz"
    (data / "temporal.db").write_bytes(gzip.decompress(stuck.read_bytes()))
    # The build already current, then a new one made current (a new user: the first is pinned to the first build).
    for user, build in (("42", "cf82659c1a5a"), ("43", "cf82659c1a5b")):
        env = {**dev_env, "COMPANION_BUILD_ID": build}
        dev = DevProcess(tmp_path, env)
        try:
            said = _companion("say", "--user", user, f"hello {build}", cwd=tmp_path, env=env)
            assert said.returncode == 0 and f"I hear you: hello {build}" in said.stdout, said.stdout + said.stderr
        finally:
            assert dev.stop() == 0, dev.tail()
    log = [json.loads(line) for line in (data / "companion.log").read_text().splitlines()]
    assert [line["build_id"] for line in log if line["event"] == "worker.routing_update_still_reported"] == [
        "cf82659c1a5a", "cf82659c1a5b"]


def test_companion_dev_moves_conversations_left_on_an_earlier_build_with_that_build_s_kept_code(
        tmp_path: Path, dev_env: dict[str, str]) -> None:
    before, after = ({**dev_env, "COMPANION_BUILD_ID": build} for build in ("before", "after"))
    dev = DevProcess(tmp_path, before)
    try:
        said = _companion("say", "--user", "42", "hello", cwd=tmp_path, env=before)
        assert said.returncode == 0, said.stderr
    finally:
        assert dev.stop() == 0, dev.tail()
    builds = tmp_path / ".companion" / "builds"
    assert (builds / "before" / "workflows" / "companion.py").read_bytes() == (
        Path(__file__).parents[1] / "workflows" / "companion.py").read_bytes()  # the code that build ran, kept

    # A changed workflow is a new build. Without the earlier build's code, nothing can move the conversation: said.
    (builds / "before").rename(tmp_path / "before")
    dev = DevProcess(tmp_path, after)
    try:
        assert ("  note        1 conversation still on build before, an earlier version of the code: only a worker "
                "of that build answers it") in dev.output.read_text()
    finally:
        assert dev.stop() == 0, dev.tail()
    assert sorted(path.name for path in builds.iterdir()) == ["after"]

    # With it, companion dev runs a worker of that code (marked here, to see it is what runs) and moves it.
    (tmp_path / "before").rename(builds / "before")
    with (builds / "before" / "worker.py").open("a") as kept:
        kept.write('\nprint("the kept code of build before", flush=True)\n')
    dev = DevProcess(tmp_path, after)
    try:
        assert "  earlier     moved 1 conversation from build before onto this one" in dev.output.read_text()
        versioning = _described(dev_env, "companion-user-42")["workflowExecutionInfo"]["versioningInfo"]
        assert versioning["deploymentVersion"]["buildId"] == "after"
        said = _companion("say", "--user", "42", "I'm back", cwd=tmp_path, env=after)
        assert said.returncode == 0 and "I hear you: I'm back" in said.stdout, said.stdout + said.stderr
    finally:
        assert dev.stop() == 0, dev.tail()
    assert "the kept code of build before" in (tmp_path / ".companion" / "earlier-builds.log").read_text()
    assert sorted(path.name for path in builds.iterdir()) == ["after"]  # no conversation is left on it
    history = _companion("history", "--user", "42", cwd=tmp_path, env=after).stdout
    assert [line.split(None, 3)[2:] for line in history.splitlines()] == [
        ["user", "42    hello"], ["companion", "I hear you: hello"],
        ["user", "42    I'm back"], ["companion", "I hear you: I'm back"]]


def _described(env: dict[str, str], workflow_id: str) -> dict:
    """`temporal workflow describe -w ID`, as JSON."""
    described = subprocess.run([str(Path(sys.executable).parent / "temporal"), "workflow", "describe", "-w",
                                workflow_id, "--address", env["TEMPORAL_ADDRESS"], "--output", "json"],
                               capture_output=True, text=True, timeout=30)
    return json.loads(described.stdout)


@pytest.mark.parametrize(("args", "says"), [
    (["say", "--user", "42", ""], "the message is empty"),
    (["say", "--user", "42", "x" * 100_000], "at most 16,000"),
    (["say", "--user", "-1", "hi"], "not a Telegram user id"),
    (["say", "--user", "0", "hi"], "not a Telegram user id"),
    (["say", "--user", "99999999999999999999", "hi"], "not a Telegram user id"),
    (["say", "--user", "42", "--timeout", "0", "hi"], "more than 0"),
    (["history", "--user", "42", "--limit", "-1"], "not a number of messages"),
    (["memory", "search", "--user", "42", "--k", "-5", "tea"], "not a number of memories"),
    (["nudges", "schedule", "--user", "42", "--in", "99999999d", "--text", "hi"], "at most 3,650 days"),
    (["nudges", "schedule", "--user", "42", "--in", "2h", "--text", ""], "text"),
    (["users", "set", "--user", "42", "--timezone", "Nowhereville"], "I don't know the time zone of 'Nowhereville'"),
    (["users", "set", "--user", "42", "--timezone", "+05:30"], "send your city instead"),
    (["users", "set", "--user", "42"], "say what to set: --timezone ZONE, --unlimited or --limited"),
    (["users", "set", "--user", "42", "--unlimited", "--limited"], "not allowed with argument"),
    (["usage", "--since", "2026-13-01"], "'2026-13-01' is not a day"),
    (["usage", "--by", "week"], "invalid choice: 'week'"),
])
def test_refused_input_gets_one_line_and_exit_status_2(tmp_path: Path, args: list[str], says: str) -> None:
    # Nothing runs: each is refused before anything is contacted.
    done = _companion(*args, cwd=tmp_path, env=_env(tmp_path, TEMPORAL_ADDRESS=f"localhost:{_free_port_pair()}"))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and says in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_a_reply_that_never_comes_ends_say_with_one_line(tmp_path: Path, dev_env: dict[str, str]) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # an LLM endpoint that takes connections and never answers
    env = {**dev_env, "OPENAI_BASE_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/v1"}
    dev = DevProcess(tmp_path, env)
    try:
        started = time.monotonic()
        said = _companion("say", "--user", "42", "--timeout", "3", "are you there?", cwd=tmp_path, env=env)
        assert said.returncode == 1 and time.monotonic() - started < 20, said.stderr
        assert said.stderr.strip().splitlines() == [said.stderr.strip()] and "no reply within 3 s" in said.stderr
        assert "Traceback" not in said.stderr and "Error" not in said.stderr
    finally:
        assert dev.stop() == 0, dev.tail()
        silent.close()


def test_a_downgrade_needs_yes_and_no_workers_and_a_message_sent_meanwhile_is_answered_after_the_upgrade(
        tmp_path: Path, dev_env: dict[str, str]) -> None:
    dev = DevProcess(tmp_path, dev_env)
    try:
        assert _companion("say", "--user", "42", "remember me", cwd=tmp_path, env=dev_env).returncode == 0
        unconfirmed = _companion("db", "downgrade", "base", cwd=tmp_path, env=dev_env)
        assert unconfirmed.returncode == 2 and "1 users, 2 messages" in unconfirmed.stderr, unconfirmed.stderr
        busy = _companion("db", "downgrade", "base", "--yes", cwd=tmp_path, env=dev_env)
        assert busy.returncode == 1 and "worker(s) poll task queue companion" in busy.stderr, busy.stderr
        assert "remember me" in _companion("history", "--user", "42", cwd=tmp_path, env=dev_env).stdout  # intact

        dropped = _companion("db", "downgrade", "base", "--yes", "--force", cwd=tmp_path, env=dev_env)
        assert dropped.returncode == 0 and "-> base" in dropped.stdout, dropped.stderr
        waiting = subprocess.Popen([sys.executable, "-m", "cli", "say", "--user", "42", "still there?"],
                                   cwd=tmp_path, env=dev_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(3)
        assert waiting.poll() is None  # no schema: the turn waits, retrying
        assert _companion("db", "upgrade", cwd=tmp_path, env=dev_env).returncode == 0
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0 and "I hear you: still there?" in out, err
    finally:
        assert dev.stop() == 0, dev.tail()


def test_companion_dev_starts_again_a_server_that_died(tmp_path: Path, dev_env: dict[str, str]) -> None:
    dev = DevProcess(tmp_path, dev_env)
    pid_file = tmp_path / ".companion" / "postgres" / "postmaster.pid"
    try:
        assert _companion("say", "--user", "42", "before", cwd=tmp_path, env=dev_env).returncode == 0
        postgres = int(pid_file.read_text().split()[0])
        os.kill(postgres, signal.SIGKILL)  # PostgreSQL dies as in a crash
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (again := int(pid_file.read_text().split()[0])) != postgres and alive(again):
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"PostgreSQL was not started again:\n{dev.tail()}")
        log = [json.loads(line) for line in (tmp_path / ".companion" / "companion.log").read_text().splitlines()]
        temporal = next(line["pid"] for line in log if line["event"] == "temporal.dev_server_started")
        os.kill(temporal, signal.SIGKILL)  # and so does the Temporal dev server
        deadline = time.monotonic() + 30
        while True:  # until the server started again answers
            said = _companion("say", "--user", "42", "--timeout", "60", "after", cwd=tmp_path, env=dev_env)
            if "nothing is running" not in said.stderr or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert said.returncode == 0 and "I hear you: after" in said.stdout, said.stderr + dev.tail()
        history = _companion("history", "--user", "42", cwd=tmp_path, env=dev_env).stdout
        assert "before" in history and "after" in history  # nothing lost
        log = (tmp_path / ".companion" / "companion.log").read_text()
        assert '"postgres.embedded_restarted"' in log and '"temporal.dev_server_died"' in log
    finally:
        assert dev.stop() == 0, dev.tail()
