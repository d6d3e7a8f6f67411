"""`companion bench locomo`: evidence recall of memory retrieval on LoCoMo long conversations.

Each conversation is loaded into a fresh user's memory through the code the remember step uses: every turn is stored
as a message (speaker_a is the user, speaker_b the companion, each message at its session's date), then remembered as
stretches of conversation; with --extract, the LLM extraction of the remember step runs over each session too. Then,
for every question of categories 1-4, the top k memories are retrieved for the question, and recall is the share of
its evidence turns those memories cover through their provenance. The last line printed is one JSON object.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.errors import InvalidInputError
from core.settings import Settings
from schemas.memory import Channel, MessageCreate, Role, UserCreate
from storage import migrate
from storage.database import create_engine, create_session_factory
from storage.embedded import postgres_url
from storage.recall import MemoryIndex
from storage.repository import MemoryRepository
from storage.semantic import create_memory_index

CATEGORIES = {1: "multi_hop", 2: "temporal", 3: "open_domain", 4: "single_hop"}
KS = (5, 10, 20)
_DATE_FORMAT = "%I:%M %p on %d %B, %Y"
# Benchmark users get Telegram ids far above real ones and are erased afterwards.
BENCH_USER_BASE = 9 * 10**15


@dataclass
class Turn:
    key: str
    dia_id: str
    speaker: str
    text: str
    at: datetime


def read_conversations(path: Path) -> list[dict[str, Any]]:
    """The LoCoMo file's conversations, checked for the fields the benchmark reads."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read LoCoMo data from {path}: {exc}", context={"path": str(path)}) from exc
    if not isinstance(data, list) or not all(isinstance(c, dict) and "conversation" in c and "qa" in c
                                             for c in data):
        raise InvalidInputError(f"{path} is not LoCoMo data: expected a list of objects with conversation and qa",
                                context={"path": str(path)})
    return data


def session_turns(sample: dict[str, Any], run: str) -> list[list[Turn]]:
    """The turns of each session in order, a minute apart from the session's date (UTC)."""
    conversation = sample["conversation"]
    sessions = []
    number = 1
    while f"session_{number}" in conversation:
        try:
            start = datetime.strptime(conversation[f"session_{number}_date_time"], _DATE_FORMAT).replace(tzinfo=UTC)
        except (KeyError, ValueError) as exc:
            raise InvalidInputError(f"session {number} of {sample.get('sample_id')} has no readable date",
                                    context={"session": number}) from exc
        turns = []
        for index, turn in enumerate(conversation[f"session_{number}"]):
            text = turn["text"]
            if turn.get("blip_caption"):  # the turn shared a photo; the companion would see its description
                text += f" [shares a photo: {turn['blip_caption']}]"
            turns.append(Turn(key=f"locomo:{run}:{turn['dia_id']}", dia_id=turn["dia_id"], speaker=turn["speaker"],
                              text=text, at=start + timedelta(minutes=index)))
        sessions.append(turns)
        number += 1
    return sessions


async def load_conversation(repo: MemoryRepository, index: MemoryIndex, sample: dict[str, Any], telegram_id: int,
                            extractor: Any = None) -> tuple[int, dict[str, str]]:
    """Store one conversation as a fresh user's messages and memories; returns the user id and key → dia_id."""
    speaker_a = sample["conversation"]["speaker_a"]
    user = await repo.get_or_create_user(UserCreate(telegram_id=telegram_id, first_name=speaker_a))
    dia_of: dict[str, str] = {}
    for turns in session_turns(sample, uuid.uuid4().hex[:8]):
        for turn in turns:
            await repo.add_message(user.id, MessageCreate(
                message_key=turn.key, role=Role.USER if turn.speaker == speaker_a else Role.ASSISTANT,
                content=turn.text, channel=Channel.CONSOLE, sent_at=turn.at, meta={"speaker": turn.speaker}))
            dia_of[turn.key] = turn.dia_id
        await index.remember_messages(user.id, [turn.key for turn in turns], user.display_name)
        if extractor is not None:
            await extractor(user.id, [turn.key for turn in turns])
    return user.id, dia_of


async def score(index: MemoryIndex, user_id: int, dia_of: dict[str, str], questions: list[dict[str, Any]],
                results: dict[str, Any], ks: tuple[int, ...] = KS) -> None:
    """Retrieve for each question of categories 1-4 and add its recall at each k to ``results``."""
    for question in questions:
        category = question.get("category")
        evidence = {e.strip() for e in question.get("evidence") or []}
        if category not in CATEGORIES or not evidence:
            continue
        found = await index.search(user_id, str(question["question"]), k=max(ks))
        results["latency_ms"].append(found.elapsed_ms)
        for k in ks:
            covered = {dia_of.get(key) for hit in found.hits[:k] for key in hit.source_keys}
            recall = len(evidence & covered) / len(evidence)
            results["recall"][k].append(recall)
            if k == results["headline"]:
                results["by_category"][category].append(recall)


def summary(results: dict[str, Any], ks: tuple[int, ...] = KS, headline: int = 10) -> dict[str, Any]:
    latency = sorted(results["latency_ms"])

    def mean(values: list[float]) -> float | None:  # None: no question of that kind
        return round(statistics.fmean(values), 4) if values else None

    out: dict[str, Any] = {f"recall@{k}": mean(results["recall"][k]) for k in ks}
    out.update({f"recall@{headline}_{name}": mean(results["by_category"][c]) for c, name in CATEGORIES.items()})
    out["questions"] = len(results["recall"][headline])
    out["p50_ms"] = round(statistics.median(latency), 2) if latency else 0.0
    out["p95_ms"] = round(latency[max(0, int(len(latency) * 0.95) - 1)], 2) if latency else 0.0
    return out


def new_results(ks: tuple[int, ...] = KS, headline: int = 10) -> dict[str, Any]:
    return {"recall": {k: [] for k in ks}, "by_category": {c: [] for c in CATEGORIES}, "latency_ms": [],
            "headline": headline}


async def run_locomo(settings: Settings, path: Path, k: int = 10, extract: bool = False) -> int:
    """Load every conversation of the file into fresh users, score retrieval, print figures, then erase the users."""
    conversations = read_conversations(path)
    ks = tuple(sorted({*KS, k}))
    with postgres_url(settings) as url:
        engine = create_engine(url)
        index = chat = None
        try:
            await migrate.upgrade(engine)
            sessions = create_session_factory(engine)
            repo = MemoryRepository(sessions)
            index = create_memory_index(settings, sessions)
            await index.store.check(index.embedder.dimension)
            extractor, chat = await _extractor(settings, repo, index) if extract else (None, None)
            results = new_results(ks, k)
            loaded = 0
            for sample in conversations:
                telegram_id = BENCH_USER_BASE + secrets.randbelow(10**12)
                started = time.perf_counter()
                user_id, dia_of = await load_conversation(repo, index, sample, telegram_id, extractor)
                loaded += len(dia_of)
                print(f"{sample.get('sample_id', '?')}: {len(dia_of)} turns loaded in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
                try:
                    await score(index, user_id, dia_of, sample["qa"], results, ks)
                finally:
                    await index.forget_user(user_id)
                    await repo.delete_user_by_telegram_id(telegram_id)
            figures = summary(results, ks, k)
            figures.update({"conversations": len(conversations), "turns": loaded, "k": k, "extract": extract,
                            "embedder": index.embedder.name, "store": index.store.name})
            print(json.dumps(figures))
        finally:
            if chat is not None:
                await chat.close()
            if index is not None:
                await index.close()
            await engine.dispose()
    return 0


async def _extractor(settings: Settings, repo: MemoryRepository, index: MemoryIndex):
    from activities.remember import Rememberer
    from clients.llm import LocalModelServer, create_chat_model

    local = LocalModelServer() if settings.uses_local_model else None
    chat = create_chat_model(settings, local.start() if local else None)
    rememberer = Rememberer(repo, index, chat)
    rememberer.keep_alive = local  # the local model's server lives as long as this object

    async def extract(user_id: int, keys: list[str]) -> None:
        await rememberer.extract_and_apply(user_id, keys)

    return extract, chat
