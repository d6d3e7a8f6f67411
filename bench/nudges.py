"""Dormant users: thousands of users each waiting on a nudge cost the worker next to nothing.

    uv run python -m bench.nudges [--users 5000] [--evicted 200]

Embedded stack: pgserver PostgreSQL, the Temporal dev server tuned by temporal-config/development.yaml, an
OpenAI-compatible stub answering at once in its own process, and the real worker as its own process
(`companion worker`, default WORKER_MAX_CACHED_WORKFLOWS) so its memory can be read from /proc.

1. Ten warm-up users talk and get a nudge, so the worker's lazily loaded code is in memory: its RSS then is the
   baseline.
2. --users users each get a nudge a week ahead (update-with-start: the workflow starts, the user and the nudge's
   record are written, the timer set), 50 at a time: `schedule_s`.
3. The worker's RSS after the last one (`worker_rss_mb`, `rss_growth_mb`): the workflow cache is bounded, so users
   beyond it are evicted and cost the worker nothing but the timer Temporal keeps for them.
4. --evicted of the first users (long evicted) send their first message, one after another: the worker replays
   their short history and answers. `evicted_turn_p95_ms` is update-with-start to reply.

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.probe import cpu_probe_s
from bench.stack import embedded_stack
from bench.turn import _percentile
from core.logging import configure_logging
from schemas.memory import Channel
from schemas.turn import ChatUser, IncomingMessage, Nudge
from workflows.client import schedule_nudge, send_message

TASK_QUEUE = "bench-nudges"
CONCURRENCY = 50
WARMUP_USERS = 10
FIRST_USER = 10_000_000


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _message(telegram_id: int, text: str) -> IncomingMessage:
    return IncomingMessage(message_key=f"bench:{telegram_id}:{time.monotonic_ns()}",
                           user=ChatUser(telegram_id=telegram_id), chat_id=telegram_id, channel=Channel.CONSOLE,
                           text=text, sent_at=datetime.now(UTC))


def _nudge(telegram_id: int) -> Nudge:
    return Nudge(nudge_id=f"bench-{telegram_id}", at=datetime.now(UTC) + timedelta(days=7),
                 text="a week later: how are you?")


async def _settle(pid: int) -> float:
    """The worker's RSS once its memory stops moving (the last tasks done, the allocator quiet)."""
    previous = rss_mb(pid)
    for _ in range(20):
        await asyncio.sleep(0.5)
        current = rss_mb(pid)
        if abs(current - previous) < 0.5:
            return current
        previous = current
    return previous


async def main(users: int, evicted: int) -> dict[str, float]:
    configure_logging("WARNING", "console")
    async with embedded_stack(TASK_QUEUE) as stack:
        client, settings, (worker,) = stack.client, stack.settings, stack.workers
        cache = settings.worker_max_cached_workflows
        for n in range(WARMUP_USERS):
            await send_message(client, settings, _message(n + 1, "warming up"))
            await schedule_nudge(client, settings, n + 1, _nudge(n + 1))
        before = await _settle(worker.pid)

        started = time.perf_counter()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(telegram_id: int) -> None:
            async with gate:
                await schedule_nudge(client, settings, telegram_id, _nudge(telegram_id))

        await asyncio.gather(*(one(FIRST_USER + n) for n in range(users)))
        schedule_s = time.perf_counter() - started
        after = await _settle(worker.pid)

        latencies = []
        for n in range(evicted):
            began = time.perf_counter()
            await send_message(client, settings, _message(FIRST_USER + n, "hello, it's been a while"))
            latencies.append((time.perf_counter() - began) * 1000)
        after_turns = rss_mb(worker.pid)
    p95 = _percentile(latencies, 0.95)
    print(f"scheduled {users} users' nudges in {schedule_s:.1f} s ({users / schedule_s:.0f}/s, {CONCURRENCY} at a "
          f"time); worker cache {cache} workflows")
    print(f"worker RSS {before:.1f} MB after {WARMUP_USERS} warm-up users, {after:.1f} MB after {users} dormant "
          f"users (+{after - before:.1f} MB), {after_turns:.1f} MB after {evicted} evicted users' turns")
    print(f"first turn of an evicted user: p50 {statistics.median(latencies):.1f} ms, p95 {p95:.1f} ms "
          f"({evicted} users, one after another)")
    return {"users": users, "schedule_s": round(schedule_s, 1), "worker_rss_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 1), "evicted_turn_p50_ms": round(statistics.median(latencies), 1),
            "evicted_turn_p95_ms": round(p95, 1)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--evicted", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(main(args.users, args.evicted))
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
