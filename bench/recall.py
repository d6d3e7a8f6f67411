"""Recall: what one search of a user's memories costs, in one statement against the rankings asked for one by one.

    uv run python -m bench.recall [--memories 60] [--searches 200] [--rounds 5]

Embedded pgserver PostgreSQL with pgvector, and the OpenAI-compatible stub in its own process answering the
embeddings call (text-embedding-3-small, 1,536 dimensions), as a worker with an OpenAI key runs. One user's
conversation of --memories messages is remembered first. Then, in alternating rounds of --searches searches each,
`MemoryIndex.search` (with pgvector: embed the query, then one statement) and the same search with the two rankings
asked for apart and fused in the process, then the best rows read (as with Pinecone). Per search: CPU of this
process, CPU of PostgreSQL, and wall time; medians over the rounds. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.probe import cpu_probe_s
from bench.stack import _children, _processes
from core.logging import configure_logging
from core.settings import load_settings
from schemas.memory import MessageCreate, Role, UserCreate
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import EmbeddedPostgres
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index
from tests.fake_openai import serve_in_subprocess

QUERIES = ["how was the climbing trip with my sister?", "what tea do I like", "when is the dentist",
           "remember the cat's name?", "Lisbon in the spring"]
TOPICS = ["went climbing with my sister", "had genmaicha tea at the corner cafe", "booked the dentist for Tuesday",
          "the cat Miso slept on the piano", "planned a spring trip to Lisbon", "fixed the bike's back wheel"]


def _postgres_cpu(pid: int) -> float:
    processes = _processes()
    return sum(processes[p][2] for p in [pid, *_children(processes, pid)] if p in processes)


async def _round(searches: int, search, postgres_pid: int) -> tuple[float, float, float]:
    """(worker CPU ms, PostgreSQL CPU ms, wall ms) per search over ``searches`` searches."""
    cpu, pg, wall = time.process_time(), _postgres_cpu(postgres_pid), time.perf_counter()
    for n in range(searches):
        await search(QUERIES[n % len(QUERIES)])
    return ((time.process_time() - cpu) * 1000 / searches, (_postgres_cpu(postgres_pid) - pg) * 1000 / searches,
            (time.perf_counter() - wall) * 1000 / searches)


async def main(memories: int, searches: int, rounds: int) -> dict[str, object]:
    configure_logging("WARNING", "console")
    folder = Path(tempfile.mkdtemp(prefix="companion-bench-"))
    postgres = EmbeddedPostgres(folder / "pg")
    llm_url, llm = serve_in_subprocess()
    try:
        engine = create_engine(postgres.start())
        await migrate.upgrade(engine)
        sessions = create_session_factory(engine)
        settings = load_settings(openai_base_url=llm_url, openai_api_key="bench")
        memory: MemoryIndex = create_memory_index(settings, sessions)
        await memory.store.check(memory.embedder.dimension)
        repo = MemoryRepository(sessions)
        user = await repo.get_or_create_user(UserCreate(telegram_id=1, first_name="Ada"))
        start = datetime.now(UTC) - timedelta(days=memories)
        keys = [f"m{n}" for n in range(memories)]
        for n, key in enumerate(keys):
            await repo.add_message(user.id, MessageCreate(
                message_key=key, role=Role.USER, content=f"On day {n} I {TOPICS[n % len(TOPICS)]}",
                sent_at=start + timedelta(days=n)))
        await memory.remember_messages(user.id, keys, "Ada")

        async def at_once(query: str) -> None:
            await memory.search(user.id, query, k=21)

        async def apart(query: str) -> None:
            await memory._search_apart(user.id, query, 21, time.perf_counter())

        figures: dict[str, list[tuple[float, float, float]]] = {"one statement": [], "apart": []}
        await _round(20, at_once, postgres.pid)  # warm: connections, prepared statements
        await _round(20, apart, postgres.pid)
        for _ in range(rounds):
            figures["one statement"].append(await _round(searches, at_once, postgres.pid))
            figures["apart"].append(await _round(searches, apart, postgres.pid))
        await memory.close()
        await engine.dispose()
    finally:
        llm.terminate()
        postgres.stop()
        shutil.rmtree(folder, ignore_errors=True)
    medians = {name: [statistics.median(part) for part in zip(*found, strict=True)] for name, found in figures.items()}
    for name, (cpu, pg, wall) in medians.items():
        print(f"{name:14s} worker CPU {cpu:5.2f} ms, PostgreSQL CPU {pg:5.2f} ms, wall {wall:5.2f} ms a search "
              f"(medians of {rounds} rounds of {searches})")
    one, two = medians["one statement"], medians["apart"]
    print(f"apart / one statement: worker CPU {two[0] / one[0]:.2f}x, PostgreSQL CPU {two[1] / one[1]:.2f}x, "
          f"wall {two[2] / one[2]:.2f}x")
    return {"memories": memories, "searches": searches, "rounds": rounds,
            "one_statement_ms": {"worker_cpu": round(one[0], 2), "postgres_cpu": round(one[1], 2),
                                 "wall": round(one[2], 2)},
            "apart_ms": {"worker_cpu": round(two[0], 2), "postgres_cpu": round(two[1], 2), "wall": round(two[2], 2)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=60)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = asyncio.run(main(args.memories, args.searches, args.rounds))
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
