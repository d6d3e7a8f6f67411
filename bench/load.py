"""Load: many users talking at once over the Telegram path, and nothing lost or duplicated.

    uv run python -m bench.load [--users 200] [--messages 5] [--rate 20] [--seconds 60] [--workers 2]
                                [--background-workers 1] [--memories 0]
    WORKFLOW_SANDBOX=false uv run python -m bench.load    # the workers' workflows outside Temporal's sandbox

Embedded stack: pgserver PostgreSQL, the Temporal dev server tuned by temporal-config/development.yaml, the real
worker as processes of their own (`companion worker`; by default as docker compose runs them, two turn workers, since
a worker's event loop answers on one core, and a background worker for the remember steps) delivering to the local
Bot API server of the tests, and an OpenAI-compatible stub answering at once in its own process. Messages
are signalled as the gateway signals them (signal-with-start, Telegram channel); a reply counts when the Bot API
server receives it.

(a) capacity: every user sends --messages messages, each as soon as the reply to the previous one arrived: turns/s.
    The users are new (their turns have no memory to recall) unless --memories gives each of them a conversation of
    that many messages, remembered, beforehand: then every turn embeds the message and searches their memories.
(b) latency under a steady load: --rate messages a second, spread over the users, for --seconds: p50/p95/p99 from
    the signal to the delivered reply. It starts once the remember steps that phase (a) ended with have landed.
Both check that every message got exactly one reply, and that PostgreSQL holds each message and each reply once.
CPU per turn is read from /proc for each process of the stack: over phase (a)'s turns alone, and over both phases
with every remember step. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from temporalio.client import Client

from bench.probe import cpu_probe_s
from bench.stack import embedded_stack
from bench.turn import _percentile
from core.logging import configure_logging
from core.settings import Settings
from schemas.memory import Channel, MessageCreate, Role, UserCreate
from schemas.turn import ChatUser, IncomingMessage
from storage.database import create_engine, create_session_factory
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index
from tests.fake_telegram import TOKEN, FakeBotAPI
from workflows.client import signal_message

TASK_QUEUE = "bench-load"
FIRST_USER = 20_000_000
PAST_TOPICS = ["the climbing trip with her sister", "genmaicha tea at the corner cafe", "the dentist on Tuesday",
               "Miso the cat sleeping on the piano", "a spring trip to Lisbon", "fixing the bike's back wheel"]


class Load:
    """Sends messages as users and notes when each one's reply reaches the Bot API server."""

    def __init__(self, client: Client, settings: Settings, api: FakeBotAPI):
        self.client, self.settings, self.api = client, settings, api
        self.sent: dict[int, list[float]] = {}  # user -> send times, in order

    async def send(self, user: int, n: int) -> None:
        self.sent.setdefault(user, []).append(time.perf_counter())
        await signal_message(self.client, self.settings, IncomingMessage(
            message_key=f"tg:{user}:{n}", user=ChatUser(telegram_id=user, first_name="Load"), chat_id=user,
            channel=Channel.TELEGRAM, text=f"message {n} from {user}", sent_at=datetime.now(UTC)))

    async def replies(self, user: int, count: int, timeout: float = 120) -> None:
        await self.api.wait_for(user, count, timeout)


def _arrivals(api: FakeBotAPI, load: Load) -> list[tuple[float, float]]:
    """(send time, signal-to-delivery latency in ms) of every message, pairing each user's replies with its messages
    in order."""
    latencies = []
    for user, sends in load.sent.items():
        for sent_at, reply in zip(sends, api.messages(user), strict=False):
            latencies.append((sent_at, (reply.received_at - sent_at) * 1000))
    return latencies


def _by_window(latencies: list[tuple[float, float]], begin: float, seconds: float = 10) -> str:
    """p50/p95 of the messages sent in each window of ``seconds`` from ``begin``."""
    windows: dict[int, list[float]] = {}
    for sent_at, latency in latencies:
        windows.setdefault(int((sent_at - begin) // seconds), []).append(latency)
    return ", ".join(f"{n * seconds:g}-{(n + 1) * seconds:g} s {statistics.median(found):.0f}/"
                     f"{_percentile(found, 0.95):.0f}" for n, found in sorted(windows.items()))


@asynccontextmanager
async def _connected(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the stack's database, closed after the block."""
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        yield connection
    finally:
        await connection.close()


async def _remembered(database_url: str, users: range) -> int:
    """How many of these users' messages (and replies) the remember step has made into memories."""
    async with _connected(database_url) as connection:
        return await connection.fetchval(
            "SELECT count(DISTINCT key) FROM memories m JOIN users u ON u.id = m.user_id, unnest(m.source_keys) key "
            "WHERE u.telegram_id >= $1 AND u.telegram_id < $2 AND key LIKE 'tg:%'", users.start, users.stop)


async def _wait_remembered(database_url: str, users: range, messages: int, timeout_s: float = 120) -> float:
    """Wait until the remember steps have made every message of these users a memory; returns the seconds waited."""
    started = time.perf_counter()
    while await _remembered(database_url, users) < 2 * messages * len(users):
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"the remember steps of phase (a) did not finish within {timeout_s:g} s")
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


async def _counts(database_url: str, users: range) -> tuple[int, int]:
    """(messages missing a row or a reply, rows beyond one per key) in PostgreSQL, of the messages the load sent."""
    async with _connected(database_url) as connection:
        rows = await connection.fetch(
            "SELECT c.message_key, count(*) AS n FROM conversations c JOIN users u ON u.id = c.user_id "
            "WHERE u.telegram_id >= $1 AND u.telegram_id < $2 AND c.message_key LIKE 'tg:%' GROUP BY c.message_key",
            users.start, users.stop)
    keys = {row["message_key"]: row["n"] for row in rows}
    asked = [key for key in keys if not key.endswith(":reply")]
    lost = sum(f"{key}:reply" not in keys for key in asked)
    return lost, sum(n - 1 for n in keys.values())


async def _give_memories(settings: Settings, database_url: str, users: range, memories: int) -> None:
    """Give each user a remembered conversation of ``memories`` messages, as the remember steps would have made it
    (the same embedder and vector store as the workers'), the last of them a day old."""
    engine = create_engine(database_url)
    sessions = create_session_factory(engine)
    repo, index = MemoryRepository(sessions), create_memory_index(settings, sessions)
    start = datetime.now(UTC) - timedelta(days=memories)
    try:
        for user in users:
            stored = await repo.get_or_create_user(UserCreate(telegram_id=user, first_name="Load"))
            keys = [f"past:{user}:{n}" for n in range(memories)]
            for n, key in enumerate(keys):
                await repo.add_message(stored.id, MessageCreate(
                    message_key=key, role=Role.USER if n % 2 == 0 else Role.ASSISTANT,
                    content=f"On day {n} we talked about {PAST_TOPICS[n % len(PAST_TOPICS)]}",
                    sent_at=start + timedelta(days=n)))
            await index.remember_messages(stored.id, keys, "Load")
    finally:
        await index.close()
        await engine.dispose()


async def main(users: int, messages: int, rate: float, seconds: float, workers: int = 2,
               background_workers: int = 1, memories: int = 0) -> dict[str, Any]:
    configure_logging("WARNING", "console")
    api = FakeBotAPI()
    api.start()
    try:
        async with embedded_stack(TASK_QUEUE, {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": api.url},
                                  workers, background_workers) as stack:
            # (a) capacity: each user's next message when the previous reply has arrived
            load = Load(stack.client, stack.settings, api)
            sandbox = stack.settings.workflow_sandbox  # the worker reads the same environment
            capacity_users = range(FIRST_USER, FIRST_USER + users)
            if memories:
                await _give_memories(stack.settings, stack.database_url, capacity_users, memories)
            cpu_before = stack.cpu_seconds()

            async def conversation(user: int) -> None:
                for n in range(messages):
                    await load.send(user, n)
                    await load.replies(user, n + 1)

            started = time.perf_counter()
            await asyncio.gather(*(conversation(user) for user in capacity_users))
            capacity_s = time.perf_counter() - started
            cpu_capacity = stack.cpu_seconds()  # the turns alone: their remember steps land after this
            turns = users * messages
            lost_a, duplicated_a = await _counts(stack.database_url, capacity_users)
            # A user's turns are remembered by one step once five wait (or after a pause), so phase (a) ends with a
            # burst of remember steps, one a user. Phase (b) measures a steady load: it starts once they have landed.
            drained_s = await _wait_remembered(stack.database_url, capacity_users, messages)

            # (b) latency at a steady rate over other users (first turns included, as in real life)
            steady_users = range(FIRST_USER + users, FIRST_USER + 2 * users)
            steady = Load(stack.client, stack.settings, api)
            total = int(rate * seconds)
            begin = time.perf_counter()
            sends = []
            for i in range(total):
                await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
                sends.append(asyncio.create_task(steady.send(steady_users[i % users], i // users)))
            await asyncio.gather(*sends)
            for user in steady_users:
                await steady.replies(user, len(steady.sent.get(user, [])))
            arrivals = _arrivals(api, steady)
            latencies = [latency for _, latency in arrivals]
            lost_b, duplicated_b = await _counts(stack.database_url, steady_users)
            await asyncio.sleep(1)  # a duplicate delivery would arrive after the reply it repeats
            cpu_after = stack.cpu_seconds()
            extra = (sum(len(api.messages(user)) - messages for user in capacity_users)
                     + sum(len(api.messages(user)) - len(steady.sent.get(user, [])) for user in steady_users))
    finally:
        api.stop()
    all_turns = turns + total
    cpu_ms = _per_turn(cpu_before, cpu_after, all_turns)
    cpu_ms_a = _per_turn(cpu_before, cpu_capacity, turns)
    p50, p95, p99 = (statistics.median(latencies), _percentile(latencies, 0.95), _percentile(latencies, 0.99))
    who = f"users with {memories} memories each" if memories else "new users"
    print(f"(a) capacity: {turns} turns by {users} {who} in {capacity_s:.1f} s = {turns / capacity_s:.1f} turns/s; "
          f"lost {lost_a}, duplicated rows {duplicated_a}; its remember steps landed {drained_s:.1f} s later")
    print(f"(b) {rate:g} messages/s for {seconds:g} s ({total} messages): signal to delivered reply p50 {p50:.1f} ms, "
          f"p95 {p95:.1f} ms, p99 {p99:.1f} ms; lost {lost_b}, duplicated rows {duplicated_b}, "
          f"extra Telegram messages {extra}")
    print(f"(b) p50/p95 ms of the messages sent in each 10 s: {_by_window(arrivals, begin)}")
    print(f"CPU per turn of phase (a), its remember steps left out: {_cpu_line(cpu_ms_a)}")
    print(f"CPU per turn over both phases ({all_turns} turns), remember steps included: {_cpu_line(cpu_ms)}")
    return {"users": users, "memories": memories, "workers": workers, "background_workers": background_workers,
            "sandbox": sandbox, "turns": turns, "turns_per_s": round(turns / capacity_s, 1), "p50_ms": round(p50, 1),
            "p95_ms": round(p95, 1), "p99_ms": round(p99, 1), "lost": lost_a + lost_b,
            "duplicated": duplicated_a + duplicated_b + extra, "cpu_ms_per_turn": cpu_ms,
            "cpu_ms_per_turn_a": cpu_ms_a}


def _per_turn(before: dict[str, float], after: dict[str, float], turns: int) -> dict[str, float]:
    """Each process's CPU between two readings, in ms a turn."""
    return {role: round((after[role] - before[role]) * 1000 / turns, 1) for role in after}


def _cpu_line(cpu_ms: dict[str, float]) -> str:
    return ", ".join(f"{role} {ms:g} ms" for role, ms in cpu_ms.items()) + f"; in all {sum(cpu_ms.values()):.0f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="`companion worker` processes (default 2)")
    parser.add_argument("--background-workers", type=int, default=1,
                        help="more worker processes for the background only (WORKER_ROLE=background; default 1); "
                             "the --workers then answer turns only (WORKER_ROLE=turns); 0 = every worker does all")
    parser.add_argument("--memories", type=int, default=0,
                        help="phase (a)'s users each have a remembered conversation of this many messages (default "
                             "0: new users)")
    args = parser.parse_args()
    result = asyncio.run(main(args.users, args.messages, args.rate, args.seconds, args.workers,
                              args.background_workers, args.memories))
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
