"""Turn latency: a message's way through Temporal to its delivered reply, against the same turn done in-process.

    uv run python -m bench.turn [--turns 300] [--encrypted]

Embedded stack: pgserver PostgreSQL, the Temporal dev server tuned by temporal-config/development.yaml, the real
worker, and an OpenAI-compatible stub that answers at once (so the figures are the companion's own overhead).
The Temporal path is what `companion say` does: update-with-start, returning when the reply is stored and handed
back. The direct path runs the same activity code in order without Temporal. With --encrypted, the client and the
worker encrypt every payload with a fresh key (PAYLOAD_KEYS, core.codec). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from openai import AsyncOpenAI
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.companion import CompanionActivities
from bench.probe import cpu_probe_s
from clients.llm import ChatModel
from core.codec import new_key_line
from core.logging import configure_logging
from core.settings import load_settings
from schemas.memory import Channel
from schemas.turn import ChatUser, GenerateReplyInput, IncomingMessage, PrepareTurnInput
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import local_embedder
from storage.vectors import PgVectorStore
from tests.fake_openai import serve_in_subprocess
from tests.processes import start_dev_server
from worker import build_worker
from workflows.client import data_converter, send_message

WARMUP_TURNS = 20


def _message(telegram_id: int, n: int) -> IncomingMessage:
    return IncomingMessage(message_key=f"bench:{telegram_id}:{n}", user=ChatUser(telegram_id=telegram_id),
                           chat_id=telegram_id, channel=Channel.CONSOLE, text=f"message number {n}",
                           sent_at=datetime.now(UTC))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _timed(turns: int, turn: Callable[[int], Awaitable[object]]) -> list[float]:
    for n in range(WARMUP_TURNS):
        await turn(-n - 1)
    latencies = []
    for n in range(turns):
        started = time.perf_counter()
        await turn(n)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


async def direct_turn(activities: CompanionActivities, telegram_id: int, n: int) -> str:
    """The turn without Temporal: the same activity code, called in order in this process."""
    message, steps = _message(telegram_id, n), ActivityEnvironment()
    prepared = await steps.run(activities.conversation.prepare_turn,
                               PrepareTurnInput(message=message, now=datetime.now(UTC)))
    reply = await steps.run(activities.reply.generate_reply, GenerateReplyInput(
        user_id=prepared.user.user_id, message_key=message.message_key, reply_key=message.reply_key,
        text=message.text, channel=message.channel, note=prepared.note))
    return reply.text


async def main(turns: int, encrypted: bool = False) -> dict[str, float | bool]:
    configure_logging("WARNING", "console")
    folder = Path(tempfile.mkdtemp(prefix="companion-bench-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm_url, llm = serve_in_subprocess()  # its own process, as a real LLM server is
    try:
        engine = create_engine(postgres.start())
        await migrate.upgrade(engine)
        chat = ChatModel(AsyncOpenAI(base_url=llm_url, api_key="bench", max_retries=0), "stub")
        sessions = create_session_factory(engine)
        # As the worker runs with an LLM server configured: recall in the prompt, the remember step with extraction.
        memory = MemoryIndex(sessions, local_embedder(), PgVectorStore(sessions))
        activities = CompanionActivities.create(MemoryRepository(sessions), chat, memory=memory, extract=True)
        direct = await _timed(turns, lambda n: direct_turn(activities, 1, n))
        env = await start_dev_server()
        async with env:
            # One user writing 300 messages back to back: the per-user rate limit would answer most of them itself.
            settings = load_settings(temporal_task_queue="bench-turn", user_messages_per_minute=0,
                                     payload_keys=new_key_line() if encrypted else None)
            client = Client(env.client.service_client, namespace=env.client.namespace,
                            data_converter=data_converter(settings))
            async with build_worker(client, settings.temporal_task_queue, activities):
                temporal = await _timed(turns, lambda n: send_message(client, settings, _message(2, n)))
        await engine.dispose()
    finally:
        llm.terminate()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)
    p50, direct_p50 = statistics.median(temporal), statistics.median(direct)
    print(f"temporal turn  p50 {p50:6.1f} ms  p95 {_percentile(temporal, 0.95):6.1f} ms  "
          f"p99 {_percentile(temporal, 0.99):6.1f} ms  ({turns} sequential turns)")
    print(f"direct turn    p50 {direct_p50:6.1f} ms  p95 {_percentile(direct, 0.95):6.1f} ms")
    return {"turns": turns, "encrypted": encrypted, "p50_ms": round(p50, 1),
            "p95_ms": round(_percentile(temporal, 0.95), 1), "direct_p50_ms": round(direct_p50, 1),
            "ratio_p50": round(p50 / direct_p50, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--encrypted", action="store_true", help="encrypt every payload (PAYLOAD_KEYS)")
    args = parser.parse_args()
    result = asyncio.run(main(args.turns, args.encrypted))
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
