"""Long-term memory: the remember step, hybrid recall in the prompt, isolation, Pinecone and pgvector, degradation."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from unittest.mock import ANY
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import event, func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.testing import ActivityEnvironment

from activities.companion import CompanionActivities
from activities.conversation import ConversationActivities
from activities.remember import Extraction, Rememberer
from activities.reply import ReplyActivities
from cli.doctor import check_memory
from cli.locomo import evidence_turns, load_conversation, new_results, run_locomo, score, summary
from core.errors import (
    ConfigurationError,
    EmbedderChangedError,
    InvalidMemoryDataError,
    RecordNotFoundError,
    VectorStoreConnectionError,
)
from core.settings import load_settings
from core.timeframe import TimeRange, time_range
from schemas.context import MEMORY_OPEN
from schemas.memory import (
    Channel,
    DiaryEntryCreate,
    FactCategory,
    MemoryKind,
    MessageCreate,
    NudgeKind,
    ProfileFactCreate,
    Role,
    TimelineEventCreate,
    UserCreate,
    UserRead,
)
from schemas.turn import ChatUser, GenerateReplyInput, IncomingMessage, PrepareTurnInput
from storage import recall, vectors
from storage.database import create_session_factory
from storage.embedding import words
from storage.models import Memory
from storage.recall import JOINED_MESSAGES, MemoryHit, MemoryIndex, NewMemory, SearchResult, joined, spread
from storage.repository import MemoryRepository
from storage.semantic import create_embedder, local_embedder
from storage.vectors import PgVectorStore, PineconeStore, namespace_of
from tests.conftest import Stack, chat_model, libpq_url, new_telegram_id
from tests.fake_openai import Fail, FakeOpenAI, Reply
from tests.fake_pinecone import FakePinecone
from tests.test_workflow import eventually
from worker import build_worker
from workflows.client import forget, send_message
from workflows.contract import workflow_id

# A short conversation in LoCoMo's format, written for these tests (the LoCoMo data itself is the benchmark's, opt-in
# with `companion bench locomo --data`).
SMALL_CONVERSATION = Path(__file__).resolve().parent / "data" / "small_conversation.json"
ONE_STACK = pytest.mark.parametrize("stack", ["dev-server"], indirect=True)


@pytest.fixture
def pinecone() -> Iterator[FakePinecone]:
    server = FakePinecone(dimension=384)
    server.url = server.start()  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
async def pinecone_memory(engine: AsyncEngine, pinecone: FakePinecone) -> AsyncIterator[MemoryIndex]:
    store = PineconeStore.connect(pinecone.api_key, pinecone.url)  # type: ignore[attr-defined]
    yield MemoryIndex(create_session_factory(engine), local_embedder(), store)
    await store.close()


def _own_queue(stack: Stack, memory: MemoryIndex, name: str) -> Stack:
    """The stack on a task queue of its own, for a worker of the test's own making (extracting, say)."""
    settings = stack.settings.model_copy(update={"temporal_task_queue": f"{name}-{uuid.uuid4()}"})
    return Stack(stack.client, settings, stack.repo, stack.llm, stack.env, memory, stack.started)


async def user_with_messages(repo: MemoryRepository, lines: list[str], start: datetime | None = None) -> int:
    # uuid, not random: hypothesis seeds `random` the same way for every example.
    user = await repo.get_or_create_user(UserCreate(telegram_id=uuid.uuid4().int % 10**15 + 1, first_name="Mia"))
    at = start or datetime(2026, 5, 1, 18, 0, tzinfo=UTC)
    for number, line in enumerate(lines):
        await repo.add_message(user.id, MessageCreate(
            message_key=f"m{user.id}-{number}", role=Role.USER if number % 2 == 0 else Role.ASSISTANT,
            content=line, channel=Channel.CONSOLE, sent_at=at + timedelta(minutes=number)))
    return user.id


async def user_who_said(repo: MemoryRepository, memory: MemoryIndex, said: dict[str, datetime]) -> UserRead:
    """A user who said each line at its time, hours apart or more (each its own memory), remembered."""
    user = await repo.get_or_create_user(UserCreate(telegram_id=new_telegram_id(), first_name="Mia"))
    keys = [f"said{user.id}-{number}" for number in range(len(said))]
    for key, (line, at) in zip(keys, said.items(), strict=True):
        await repo.add_message(user.id, MessageCreate(message_key=key, role=Role.USER, content=line,
                                                      channel=Channel.CONSOLE, sent_at=at))
    await memory.remember_messages(user.id, keys, user.display_name)
    return user


async def memory_count(engine: AsyncEngine, user_id: int, kind: MemoryKind | None = None) -> int:
    async with engine.connect() as connection:
        statement = select(func.count()).select_from(Memory).where(Memory.user_id == user_id)
        if kind is not None:
            statement = statement.where(Memory.kind == kind.value)
        return (await connection.execute(statement)).scalar_one()


def _remember_steps(events: list) -> list[dict]:  # type: ignore[type-arg]
    """The inputs of the remember steps a history scheduled, in order."""
    return [json.loads(event.activity_task_scheduled_event_attributes.input.payloads[0].data)
            for event in events if event.activity_task_scheduled_event_attributes.activity_type.name == "remember"]


async def _conversation_sources(engine: AsyncEngine, repo: MemoryRepository, telegram_id: int) -> set[str]:
    """The message keys the user's indexed stretches of conversation came from."""
    user = await repo.get_user_by_telegram_id(telegram_id)
    async with engine.connect() as connection:
        sources = (await connection.execute(select(Memory.source_keys).where(
            Memory.user_id == user.id, Memory.kind == MemoryKind.CONVERSATION.value))).scalars().all()
    return {key for keys in sources for key in keys}


# --- recall in the turn ------------------------------------------------------------------------------------------


@ONE_STACK
async def test_the_prompt_recalls_what_the_user_said_long_before_the_recent_turns(
        stack: Stack, engine: AsyncEngine) -> None:
    mia = new_telegram_id()
    await stack.say(mia, "My sister Ana moved to Lisbon last spring, she teaches piano there.")
    for number in range(14):
        await stack.say(mia, f"Filler message {number} about the weather and traffic today.")
    user = await stack.repo.get_user_by_telegram_id(mia)
    # The remember step runs after each reply: wait for all 15 turns (30 messages) to be memories.
    await eventually(lambda: memory_count(engine, user.id, MemoryKind.CONVERSATION), lambda n: n == 30)

    await stack.say(mia, "Which city does my sister live in again?")
    *conversation, recalled, message = stack.llm.requests[-1]["messages"]
    assert message["content"] == "Which city does my sister live in again?"
    assert not any("Lisbon" in turn["content"] for turn in conversation)  # long gone from the recent turns...
    assert recalled["role"] == "system"  # ...but recalled, quoted in a memory block right before the message
    memories = recalled["content"].split("memories that may matter now")[1]
    assert "Lisbon" in memories and "piano" in memories
    assert recalled["content"].index("Lisbon") < recalled["content"].index("</user_memory>")


async def test_a_new_user_s_turns_ask_for_no_embedding_until_they_have_memories(
        repo: MemoryRepository, engine: AsyncEngine, fake_llm: FakeOpenAI) -> None:
    settings = load_settings(openai_api_key="sk-test-key", openai_base_url=fake_llm.url)
    sessions = create_session_factory(engine)
    index = MemoryIndex(sessions, create_embedder(settings), PgVectorStore(sessions))
    await index.store.check(index.embedder.dimension)
    conversation, reply = ConversationActivities(repo, index), ReplyActivities(repo, chat_model(fake_llm), index)
    mia = await user_with_messages(repo, [])
    telegram_id = (await repo.get_user(mia)).telegram_id

    async def turn(key: str, text: str) -> str:
        message = IncomingMessage(message_key=key, user=ChatUser(telegram_id=telegram_id), chat_id=telegram_id,
                                  channel=Channel.CONSOLE, text=text, sent_at=datetime.now(UTC))
        await ActivityEnvironment().run(conversation.prepare_turn, PrepareTurnInput(message=message,
                                                                                    now=datetime.now(UTC)))
        await ActivityEnvironment().run(reply.generate_reply, GenerateReplyInput(
            user_id=mia, message_key=key, reply_key=f"{key}:reply", text=text, channel=Channel.CONSOLE))
        return fake_llm.requests[-1]["messages"][-2]["content"]  # what comes right before the message

    await turn("a", "My favourite tea is genmaicha, toasty and nutty.")
    assert [request for request in fake_llm.requests if "input" in request] == []  # nothing to search yet
    # A memory from outside the recent turns (those are in the prompt already, and recall leaves them out).
    await index.add(mia, [NewMemory(key="fact:tea", kind=MemoryKind.FACT, content="Mia's favourite tea: genmaicha",
                                    occurred_at=datetime.now(UTC), source_keys=[])])
    fake_llm.requests.clear()
    system = await turn("b", "What tea do I like again?")
    assert [request["input"] for request in fake_llm.requests if "input" in request] == [
        ["What tea do I like again?"]]
    assert "genmaicha" in system.split("memories that may matter now")[1]
    await index.close()


# --- the remember step: extraction with update semantics and provenance -----------------------------------------


@ONE_STACK
async def test_extraction_updates_facts_keeps_history_and_provenance_and_sets_reminders(
        stack: Stack, engine: AsyncEngine, memory: MemoryIndex) -> None:
    extracting = _own_queue(stack, memory, "remember")
    mia = new_telegram_id()
    soon = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0, tzinfo=None)
    stack.llm.script_json(
        {"facts": [{"category": "work", "key": "employer", "value": "Acme"},
                   {"category": "hobbies", "key": "sport", "value": "climbing"}],
         "events": [{"title": "first day at Acme", "when": soon.isoformat()}],
         "milestones": [{"title": "New job", "content": "Mia started as a designer at Acme", "importance": 4}],
         "reminders": [{"what": "call the bank", "when": soon.isoformat()}],
         "summary": "Mia just joined Acme as a designer and climbs on weekends."},
        {"facts": [{"category": "work", "key": "Employer", "value": "Globex"},
                   {"category": "hobbies", "key": "sport", "value": "Climbing"}],
         "events": [], "milestones": [], "reminders": [],
         "summary": "Mia left Acme for Globex; still climbs on weekends."})
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=memory, extract=True)
    async with build_worker(stack.client, extracting.settings.temporal_task_queue, activities):
        first = await extracting.say(mia, "Big news: I started at Acme as a designer! Also, I climb on weekends.")
        user = await stack.repo.get_user_by_telegram_id(mia)
        await eventually(lambda: extracting.state(mia), lambda state: bool(state.summary))
        second = await extracting.say(mia, "Update: I left Acme, I'm at Globex now.")
        await eventually(lambda: extracting.state(mia), lambda state: "Globex" in state.summary)
        # What recall finds of "Acme" once the change is remembered (the next turn's memories land at their own time).
        recalled = [hit.content for hit in (await memory.search(user.id, "Acme", k=5)).hits]
        await extracting.say(mia, "Do you remember my time at Acme?")
        state = await extracting.state(mia)

    structured = [r for r in stack.llm.requests if r.get("response_format")]
    assert structured[0]["response_format"]["json_schema"]["strict"] is True
    assert "NEW" in structured[0]["messages"][1]["content"]  # the turn's messages are marked new

    facts = await stack.repo.list_profile_facts(user.id, include_history=True)
    employer_rows = [f for f in facts if f.key == "employer"]
    employer = [(f.value, f.valid_to is None, f.source_keys) for f in employer_rows]
    assert employer == [("Acme", False, [first.message_key]), ("Globex", True, [second.message_key])]
    sport = [f for f in facts if f.key == "sport"]  # the same value again is no new fact: provenance grows
    assert len(sport) == 1 and sport[0].source_keys == [first.message_key, second.message_key]

    async with engine.connect() as connection:
        fact_memory = (await connection.execute(select(Memory.content, Memory.source_keys).where(
            Memory.user_id == user.id, Memory.memory_key == "fact:work:employer"))).one()
    assert "Globex" in fact_memory.content and "Acme" not in fact_memory.content
    assert fact_memory.source_keys == [second.message_key]
    # The superseded value stays findable, said as past (recall brings it when the conversation it came from has
    # left the prompt), while the facts the prompt gives as current name only the new value.
    until = employer_rows[0].valid_to
    past = f"Until {until.day} {until:%B %Y}, {user.display_name}'s employer (work) was Acme; it no longer is."
    assert past in recalled
    asked = [r for r in stack.llm.requests if not r.get("response_format")][-1]["messages"]
    assert '- work/"employer": "Globex"' in asked[0]["content"] and '"Acme"' not in asked[0]["content"]
    # Forgetting the fact (/memory) forgets its past too: neither value is recalled after.
    await stack.repo.forget_memory_item(user.id, f"fact:{employer_rows[1].id}")
    async with engine.connect() as connection:
        left = (await connection.execute(select(Memory.memory_key).where(
            Memory.user_id == user.id, Memory.memory_key.like("fact:work:employer%")))).scalars().all()
    assert left == []

    (event,) = await stack.repo.events_between(user.id, datetime.now(UTC), datetime.now(UTC) + timedelta(days=3))
    assert event.title == "first day at Acme" and event.source_keys == [first.message_key]
    (entry,) = await stack.repo.recent_diary_entries(user.id)
    assert entry.title == "New job" and entry.source_keys == [first.message_key]
    reminders = [n for n in state.nudges if n.kind == NudgeKind.REMINDER]
    assert [n.text for n in reminders] == ["⏰ Reminder: call the bank"]
    assert reminders[0].at.replace(tzinfo=None) == soon  # the user's zone is UTC

    # The running summary is carried in the workflow and rendered into the next prompt.
    last_prompt = [r for r in stack.llm.requests if not r.get("response_format")][-1]["messages"][0]["content"]
    assert "Mia left Acme for Globex" in last_prompt


@ONE_STACK
async def test_a_reminder_set_from_the_message_is_not_set_again_by_the_extraction(
        stack: Stack, memory: MemoryIndex) -> None:
    extracting = _own_queue(stack, memory, "remember")
    mia = new_telegram_id()
    later = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0, tzinfo=None)
    stack.llm.script_json(  # the extraction finds the reminder the message's own parser has already set
        {"facts": [], "events": [], "milestones": [], "reminders": [{"what": "stretch", "when": later.isoformat()}],
         "summary": "Mia asked to be reminded to stretch."},
        {"facts": [], "events": [], "milestones": [], "reminders": [{"what": "call the bank",
                                                                       "when": later.isoformat()}],
         "summary": "Mia asked to be reminded to stretch, and to call the bank."})
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=memory, extract=True)
    async with build_worker(stack.client, extracting.settings.temporal_task_queue, activities):
        await extracting.say(mia, "Remind me in 2 hours to stretch")
        await eventually(lambda: extracting.state(mia), lambda state: bool(state.summary))
        await extracting.say(mia, "And I need to call the bank at some point")  # only the extraction sees it
        state = await eventually(lambda: extracting.state(mia), lambda state: "bank" in state.summary)

    assert sorted(n.text for n in state.nudges if n.kind == NudgeKind.REMINDER) == [
        "⏰ Reminder: call the bank", "⏰ Reminder: stretch"]


async def test_applying_an_extraction_twice_stores_nothing_twice(
        repo: MemoryRepository, memory: MemoryIndex, engine: AsyncEngine) -> None:
    user_id = await user_with_messages(repo, ["I got engaged to Sam!", "Congratulations!"])
    user = await repo.get_user(user_id)
    found = Extraction.parse(json.dumps({
        "facts": [{"category": "relationships", "key": "partner", "value": "Sam"}, {"category": "nonsense"}],
        "events": [{"title": "engagement party", "when": "2026-06-01"}, {"title": "bad", "when": "someday"}],
        "milestones": [{"title": "Engaged", "content": "Mia got engaged to Sam", "importance": 5}],
        "reminders": [], "summary": "Mia is engaged."}))
    assert len(found.facts) == 1  # the malformed item is dropped, the rest kept
    rememberer = Rememberer(repo, memory, None)
    now = datetime(2026, 5, 1, 18, 5, tzinfo=UTC)
    first = await rememberer.apply(user, f"m{user_id}-0", found, now)
    again = await rememberer.apply(user, f"m{user_id}-0", found, now)  # a retried activity

    assert (first.facts, first.events, first.milestones) == (1, 1, 1) == (again.facts, again.events, again.milestones)
    assert len(await repo.list_profile_facts(user_id, include_history=True)) == 1
    events = await repo.events_between(user_id, now - timedelta(days=365), now + timedelta(days=365))
    assert [(e.title, e.event_at.hour) for e in events] == [("engagement party", 9)]  # a bare date: 09:00 local
    assert len(await repo.recent_diary_entries(user_id)) == 1
    assert await memory_count(engine, user_id) == 3  # fact, event, diary: one memory each


# --- search in one statement ---------------------------------------------------------------------------------


async def _apart(memory: MemoryIndex, user_id: int, query: str, k: int, when: TimeRange | None = None) -> SearchResult:
    """Search with the rankings asked for one by one and fused here (as with Pinecone), the words ranking too."""
    return await memory._search_apart(user_id, query, k, time.perf_counter(), when=when,
                                      wording=(await memory._embed_query(query))[1])


async def test_search_with_pgvector_is_one_statement_ranking_as_the_rankings_fused_one_by_one(
        engine: AsyncEngine, repo: MemoryRepository, memory: MemoryIndex) -> None:
    lines = ["We adopted a cat called Miso", "Miso sleeps on the piano all day", "My sister lives in Lisbon",
             "I play the piano on Sundays with my sister", "The job interview at Acme is on Friday",
             "I keep bees in the garden", "The bees made honey for my sister", "Tea with lemon and honey, always"]
    user_id = await user_with_messages(repo, lines)
    await memory.remember_messages(user_id, [f"m{user_id}-{n}" for n in range(len(lines))], "Mia")
    statements: list[str] = []

    def sent(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement)

    for query in ("my sister and the piano", "honey", "what is the cat called?", "Friday interview", "zebra",
                  "the"):
        event.listen(engine.sync_engine, "before_cursor_execute", sent)
        try:
            at_once = await memory.search(user_id, query, k=6)
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", sent)
        assert len(statements) == 1, query
        statements.clear()
        apart = await _apart(memory, user_id, query, 6)
        assert not at_once.degraded and at_once.hits, query
        assert [(hit.memory_id, hit.score, hit.via, hit.content, hit.source_keys) for hit in at_once.hits] == [
            (hit.memory_id, hit.score, hit.via, hit.content, hit.source_keys) for hit in apart.hits], query
    both = await memory.search(user_id, "honey", k=6)
    assert "honey" in both.hits[0].content and both.hits[0].via == ("vector", "keyword")
    assert await memory.search(await user_with_messages(repo, []), "honey", k=6) == SearchResult([], False, ANY)


async def test_keyword_ranking_is_bm25_over_the_users_own_memories(engine: AsyncEngine, repo: MemoryRepository,
                                                                  memory: MemoryIndex) -> None:
    lines = ["The bees made honey, honey everywhere, honey on the table", "Tea with lemon and honey",
             "My sister keeps bees in Lisbon", "Tea at five, always", "A long walk by the river with my sister"]
    start = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    user_id = (await user_who_said(repo, memory, {line: start + timedelta(days=n) for n, line in enumerate(lines)})).id
    # Another user's words count for nothing.
    await user_who_said(repo, memory, {"honey " * 20: start, "bees and honey": start + timedelta(days=1)})
    query = "honey bees for my sister?"
    async with engine.connect() as connection:
        ranked = (await connection.execute(recall._KEYWORD_SQL, {"query": query, "user_id": user_id,
                                                                 "limit": 100})).all()
        lexemes = (await connection.execute(text(
            "SELECT m.id, u.lexeme, array_length(u.positions, 1) FROM memories m, unnest(m.search) AS u "
            "WHERE m.user_id = :u"), {"u": user_id})).all()
        terms = set((await connection.execute(text(
            "SELECT lexeme FROM unnest(to_tsvector('english', :q))"), {"q": query})).scalars())
    said: dict[int, dict[str, int]] = {}
    for memory_id, lexeme, count in lexemes:
        said.setdefault(memory_id, {})[lexeme] = count
    average = sum(map(len, said.values())) / len(said)
    idf = {term: math.log(1 + (len(said) - df + 0.5) / (df + 0.5))
           for term in terms if (df := sum(term in held for held in said.values()))}
    k1, b = recall.BM25_K1, recall.BM25_B
    expected = {memory_id: sum(idf[term] * held[term] * (k1 + 1)
                               / (held[term] + k1 * (1 - b + b * len(held) / average)) for term in idf if term in held)
                for memory_id, held in said.items() if terms & held.keys()}
    assert terms == {"honey", "bee", "sister"} and len(ranked) == len(expected) < len(said)
    assert [row.score for row in ranked] == sorted(expected.values(), reverse=True)
    assert all(math.isclose(row.score, expected[row.id]) for row in ranked)


async def test_a_question_about_last_week_recalls_last_weeks_memory_over_a_more_similar_older_one(
        repo: MemoryRepository, memory: MemoryIndex) -> None:
    tokyo = ZoneInfo("Asia/Tokyo")
    now = datetime(2026, 12, 9, 12, 0, tzinfo=tokyo)  # a Wednesday: last week is Monday 30 Nov to Sunday 6 Dec
    said = {  # when each was said, in Tokyo
        "We went hiking in the mountains and had a picnic by the lake": datetime(2026, 10, 11, 15, 0, tzinfo=tokyo),
        "Sunday we walked up the hill behind the village with the dog": datetime(2026, 12, 6, 23, 30, tzinfo=tokyo),
        "I baked bread for the neighbours": datetime(2026, 12, 8, 10, 0, tzinfo=tokyo),
    }
    user = await user_who_said(repo, memory, said)
    question = "Where did we go hiking last week?"

    anytime = await memory.search(user.id, question, k=3)
    assert "mountains" in anytime.hits[0].content  # the older memory matches the words better

    when = time_range(question, now, tokyo)
    assert when is not None and when.phrase == "last week"
    # Sunday 23:30 in Tokyo is still last week there (14:30 UTC), while Tuesday's bread is this week's.
    found = await memory.search(user.id, question, k=3, when=when)
    assert "walked up the hill" in found.hits[0].content and "time" in found.hits[0].via
    assert "mountains" in found.hits[1].content  # a prior, not a filter: the rest still come, best first
    apart = await _apart(memory, user.id, question, 3, when)
    assert [(h.memory_id, h.score, h.via) for h in apart.hits] == [(h.memory_id, h.score, h.via) for h in found.hits]


class VectorsOnly:
    """The offline embedder's vectors without its words, as an embedder that gives none (OpenAI's) searches."""

    name = "all-MiniLM-L6-v2-int8"
    dimension = 384

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return await local_embedder().embed(texts)

    async def close(self) -> None:
        pass


async def test_a_question_finds_the_memories_that_answer_it_by_their_words_without_sharing_one(
        engine: AsyncEngine, repo: MemoryRepository, memory: MemoryIndex) -> None:
    hobbies = ["I signed up for a pottery class, I made my first bowl today",
               "We went camping by the lake and I swam every morning",
               "I painted a sunset over the harbour last night"]
    chores = ["Activities at work are piling up, the quarterly review is next week",
              "The dentist said my teeth are fine", "Traffic was awful on the way home",
              "My landlord is raising the rent again", "The new phone battery dies by noon",
              "I cannot decide what to cook tonight", "The bank closed my old account"]
    lines = [*hobbies[:1], *chores[:3], *hobbies[1:2], *chores[3:5], *hobbies[2:], *chores[5:]]
    start = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    user = await user_who_said(repo, memory, {line: start + timedelta(days=day) for day, line in enumerate(lines)})

    question = "What activities does Mia enjoy?"  # "activities" is a word of a chore alone
    found = await memory.search(user.id, question, k=5)
    assert sum(any(line in hit.content for hit in found.hits) for line in hobbies) >= 2
    sessions = create_session_factory(engine)
    unworded = await MemoryIndex(sessions, VectorsOnly(), PgVectorStore(sessions)).search(
        user.id, question, k=5)  # the same vectors and keywords, no words ranking
    assert not any(line in hit.content for hit in unworded.hits for line in hobbies)


async def test_overlapping_stretches_found_for_a_question_are_shown_once_as_one(repo: MemoryRepository,
                                                                              memory: MemoryIndex) -> None:
    lines = ["We adopted a puppy last weekend!", "How lovely! What is the puppy called?",
             "Her name is Biscuit, she is a beagle", "Biscuit the beagle, perfect.",
             "Biscuit already chewed my favourite slippers", "Puppies chew everything, Biscuit will grow out of it.",
             "The weather is grey today", "Grey days are good for reading.", "I started a crime novel",
             "Which one?", "One set in Oslo, in winter"]
    user_id = await user_with_messages(repo, lines)  # one sitting, a minute apart
    keys = [f"m{user_id}-{number}" for number in range(len(lines))]
    await memory.remember_messages(user_id, keys, "Mia")
    said = {key: f"{'Mia' if number % 2 == 0 else 'Companion'}: {line}"
            for number, (key, line) in enumerate(zip(keys, lines, strict=True))}

    found = await memory.search(user_id, "What is Mia's puppy Biscuit like?", k=3)
    best = found.hits[0]
    # The stretches around the puppy (three messages each, overlapping) are one, read in order, each message once.
    assert 3 < len(best.source_keys) <= JOINED_MESSAGES
    first = keys.index(best.source_keys[0])
    assert best.source_keys == keys[first:first + len(best.source_keys)]
    assert best.content == "\n".join(said[key] for key in best.source_keys)
    assert "Biscuit" in best.content


def _stretch(numbers: range, kind: MemoryKind = MemoryKind.CONVERSATION, cut: int | None = None) -> MemoryHit:
    """A hit for the stretch of messages ``numbers`` ("Mia: line n" each, keys "kn"), its text cut at ``cut``."""
    return MemoryHit(memory_id=numbers[-1], kind=kind, content="\n".join(f"Mia: line {n}" for n in numbers)[:cut],
                     occurred_at=datetime(2026, 5, 1, 18, numbers[-1], tzinfo=UTC),
                     source_keys=[f"k{n}" for n in numbers], score=1.0, via=("vector",))


def test_found_memories_show_each_message_once_while_other_moments_are_found() -> None:
    found = [_stretch(range(0, 3)), _stretch(range(1, 4)), _stretch(range(20, 23)), _stretch(range(2, 5)),
             _stretch(range(3, 6)), _stretch(range(21, 24), kind=MemoryKind.FACT), _stretch(range(40, 43))]
    hits = spread(found, k=3)
    # [1-3] and [2-4] join [0-2]; [3-5] would show 3 and 4 twice, so it waits, as does the fact from 21-23.
    assert [hit.source_keys for hit in hits] == [[f"k{n}" for n in numbers]
                                                 for numbers in (range(0, 5), range(20, 23), range(40, 43))]
    assert hits[0].content == "\n".join(f"Mia: line {n}" for n in range(5))
    # With fewer other moments than asked for, what waited comes last.
    assert [hit.source_keys for hit in spread(found[:6], k=4)][2:] == [[f"k{n}" for n in range(3, 6)],
                                                                        [f"k{n}" for n in range(21, 24)]]


def test_only_stretches_of_one_conversation_whose_texts_line_up_join() -> None:
    at = datetime(2026, 5, 1, 18, 0, tzinfo=UTC)
    together = joined(_stretch(range(2, 5)), _stretch(range(0, 3)))
    assert together is not None and together.memory_id == 4 and together.occurred_at == at + timedelta(minutes=4)
    assert together.content == "\n".join(f"Mia: line {n}" for n in range(5))
    assert together.source_keys == [f"k{n}" for n in range(5)]
    assert joined(_stretch(range(0, 3)), _stretch(range(2, 5), kind=MemoryKind.FACT)) is None  # a fact stays apart
    assert joined(_stretch(range(0, 3)), _stretch(range(3, 6))) is None  # no message in common
    assert joined(_stretch(range(0, 3)), _stretch(range(2, 3 + JOINED_MESSAGES))) is None  # too long together
    assert joined(_stretch(range(0, 3), cut=20), _stretch(range(2, 5))) is None  # a text cut short does not line up


async def test_memories_keep_their_words_and_reindexing_what_is_missing_gives_them_to_older_ones(
        engine: AsyncEngine, repo: MemoryRepository, memory: MemoryIndex) -> None:
    user_id = await user_with_messages(repo, ["I keep bees in the garden", "Is it the one?"])
    await memory.remember_messages(user_id, [f"m{user_id}-0", f"m{user_id}-1"], "Mia")

    async def stored() -> list[bytes | None]:
        async with engine.connect() as connection:
            return list((await connection.execute(text(
                "SELECT word_vectors FROM memories WHERE user_id = :u ORDER BY id"), {"u": user_id})).scalars())

    kept = await stored()
    # "Mia: I keep bees in the garden" is four words (mia, keep, bees, garden); "Is it the one?" has one (one).
    assert [len(words(vectors)) for vectors in kept] == [4, 4 + 2]
    async with engine.begin() as connection:  # as memories stored before words were kept
        await connection.execute(text("UPDATE memories SET word_vectors = NULL WHERE user_id = :u"), {"u": user_id})
    assert await memory.reindex(user_id, everything=False) == 2
    assert await stored() == kept
    assert await memory.reindex(user_id, everything=False) == 0


async def test_before_the_move_is_dated_by_the_memory_of_the_move(repo: MemoryRepository,
                                                                  memory: MemoryIndex) -> None:
    said = {
        "I work at the bakery on Rua Augusta, early shifts": datetime(2026, 1, 10, 9, 0, tzinfo=UTC),
        "We moved to Porto today, boxes everywhere": datetime(2026, 3, 2, 18, 0, tzinfo=UTC),
        "I work at the bookshop by the river now, I love it": datetime(2026, 5, 20, 9, 0, tzinfo=UTC),
    }
    user = await user_who_said(repo, memory, said)
    now = datetime(2026, 6, 1, tzinfo=UTC)

    before = await memory.time_named(user.id, "Where did I work before the move?", now, ZoneInfo("UTC"))
    assert before is not None and before.end == said["We moved to Porto today, boxes everywhere"]
    found = await memory.search(user.id, "Where did I work before the move?", k=3, when=before)
    assert "bakery" in found.hits[0].content
    since = await memory.time_named(user.id, "Where have I worked since the move?", now, ZoneInfo("UTC"))
    found = await memory.search(user.id, "Where have I worked since the move?", k=3, when=since)
    assert "bookshop" in found.hits[0].content
    # Nothing to date it by: no time is named, and recall goes on as usual.
    assert await memory.time_named(user.id, "What did I do before the wedding?", now, ZoneInfo("UTC")) is None


def test_time_phrases_are_read_in_the_users_zone_as_calendar_spans() -> None:
    tokyo, paris = ZoneInfo("Asia/Tokyo"), ZoneInfo("Europe/Paris")
    now = datetime(2026, 12, 5, 16, 30, tzinfo=UTC)  # Sunday 01:30 in Tokyo, Saturday 17:30 in Paris

    def span(text: str, zone: ZoneInfo) -> tuple[str, str] | None:
        found = time_range(text, now, zone)
        return found and (f"{found.start.astimezone(zone):%Y-%m-%d}", f"{found.end.astimezone(zone):%Y-%m-%d}")

    assert span("what did I do yesterday?", tokyo) == ("2026-12-05", "2026-12-06")
    assert span("what did I do yesterday?", paris) == ("2026-12-04", "2026-12-05")
    assert span("where did I live in May?", paris) == ("2026-05-01", "2026-06-01")
    assert span("and in December?", paris) == ("2026-12-01", "2027-01-01")
    assert span("since March 2025", paris) == ("2025-03-01", "2026-12-06")
    assert span("two years ago", paris) == ("2024-01-01", "2025-01-01")
    assert span("a couple of weeks ago", paris) == ("2026-11-16", "2026-11-23")
    assert span("last weekend", paris) == ("2026-11-28", "2026-11-30")
    assert span("on Friday", paris) == ("2026-12-04", "2026-12-05")
    assert span("on the 3rd of March", paris) == ("2026-03-03", "2026-03-04")
    assert span("before 2020", paris)[1] == "2020-01-01"
    for said in ("may I ask you something?", "I may move", "remind me in 2 hours", "what's my name?"):
        assert time_range(said, now, paris) is None, said


async def test_with_the_embeddings_endpoint_refusing_pgvector_search_goes_on_with_keywords(
        repo: MemoryRepository, engine: AsyncEngine, fake_llm: FakeOpenAI) -> None:
    settings = load_settings(openai_api_key="sk-test-key", openai_base_url=fake_llm.url)
    embedder = create_embedder(settings)
    sessions = create_session_factory(engine)
    index = MemoryIndex(sessions, embedder, PgVectorStore(sessions))
    await index.store.check(embedder.dimension)
    mia = await user_with_messages(repo, ["My favourite tea is genmaicha", "Toasty and nutty!"])
    await index.remember_messages(mia, [f"m{mia}-0", f"m{mia}-1"], "Mia")
    fake_llm.script(Fail(400, "The embeddings endpoint refuses this request."))
    found = await index.search(mia, "favourite tea")
    assert found.degraded and "genmaicha" in found.hits[0].content and found.hits[0].via == ("keyword",)
    assert (await index.search(mia, "favourite tea")).hits[0].via == ("vector", "keyword")  # back to both
    await embedder.close()


# --- isolation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["pgvector", "pgvector-index", "pinecone"])
async def test_no_search_returns_another_users_memories(
        store: str, repo: MemoryRepository, memory: MemoryIndex, pinecone_memory: MemoryIndex,
        monkeypatch: pytest.MonkeyPatch) -> None:
    index = pinecone_memory if store == "pinecone" else memory
    if store == "pgvector-index":  # users past the exact search's limit are searched through the HNSW index
        monkeypatch.setattr(vectors, "EXACT_SEARCH_LIMIT", 1)
    secret = ["My bank PIN hint is blue giraffe", "Noted, I will keep that safe.", "And my doctor is Dr Okafor."]
    alice = await user_with_messages(repo, secret)
    bob = await user_with_messages(repo, ["I love hiking in the Alps", "That sounds lovely!"])
    for user_id, count in ((alice, 3), (bob, 2)):
        await index.remember_messages(user_id, [f"m{user_id}-{n}" for n in range(count)], "someone")

    for query in ("blue giraffe PIN hint", "who is my doctor?", "hiking", "Okafor"):
        found = await index.search(bob, query, k=20)
        assert found.hits and not found.degraded
        assert all(key.startswith(f"m{bob}-") for hit in found.hits for key in hit.source_keys), query
        assert not any("giraffe" in hit.content or "Okafor" in hit.content for hit in found.hits)
    assert any("giraffe" in hit.content for hit in (await index.search(alice, "blue giraffe", k=3)).hits)


async def test_a_user_past_the_exact_search_limit_gets_the_same_neighbours_through_the_index(
        engine: AsyncEngine, repo: MemoryRepository, memory: MemoryIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = ["We adopted a cat called Miso", "My sister lives in Lisbon", "I play the piano on Sundays",
             "The job interview at Acme is on Friday", "I keep bees in the garden", "Tea with lemon, always"]
    user_id = await user_with_messages(repo, lines)
    await memory.remember_messages(user_id, [f"m{user_id}-{n}" for n in range(len(lines))], "someone")
    vector = (await memory.embedder.embed(["my cat Miso"]))[0]
    newcomer = await user_with_messages(repo, [])
    exact = await memory.store.query(user_id, vector, 4)
    assert len(exact) == 4 and await memory.store.query(newcomer, vector, 4) == []
    monkeypatch.setattr(vectors, "EXACT_SEARCH_LIMIT", 2)
    indexed = await memory.store.query(user_id, vector, 4)
    assert await memory.store.query(newcomer, vector, 4) == []
    assert [(hit.memory_id, round(hit.score, 5)) for hit in indexed] == [
        (hit.memory_id, round(hit.score, 5)) for hit in exact]
    # Its vectors were not in the index (it has few memories): the search put them there first.
    assert await _in_ann_index(engine, user_id) == (True, {True})


async def _in_ann_index(engine: AsyncEngine, user_id: int) -> tuple[bool, set[bool]]:
    """Whether the user is marked as in the HNSW index, and the marks their memories carry."""
    async with engine.connect() as connection:
        user = (await connection.execute(text("SELECT ann_indexed FROM users WHERE id = :id"),
                                         {"id": user_id})).scalar_one()
        rows = await connection.execute(select(Memory.ann_indexed).where(Memory.user_id == user_id))
        return user, {row[0] for row in rows}


async def test_the_hnsw_index_holds_the_vectors_of_users_with_many_memories_alone(
        engine: AsyncEngine, repo: MemoryRepository, memory: MemoryIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = ["We adopted a cat called Miso", "My sister lives in Lisbon", "I play the piano on Sundays",
             "The job interview at Acme is on Friday", "I keep bees in the garden", "Tea with lemon, always",
             "My brother is a pilot", "We went to Porto in May"]
    heavy, light = await user_with_messages(repo, lines), await user_with_messages(repo, lines)
    await memory.remember_messages(light, [f"m{light}-{n}" for n in range(len(lines))], "someone")
    first = await memory.remember_messages(heavy, [f"m{heavy}-{n}" for n in range(2)], "someone")
    monkeypatch.setattr(vectors, "ANN_INDEX_FROM", len(first) + 1)
    assert await _in_ann_index(engine, heavy) == (False, {False})  # searched exactly: kept out of the index

    await memory.remember_messages(heavy, [f"m{heavy}-{n}" for n in range(2, 6)], "someone")
    assert await _in_ann_index(engine, heavy) == (True, {True})  # it joined, with the memories it had before
    await memory.remember_messages(heavy, [f"m{heavy}-{n}" for n in range(6, len(lines))], "someone")
    assert await _in_ann_index(engine, heavy) == (True, {True})  # and later ones join as they are written
    # As many memories, all written before the threshold came down: a user joins the index on a write.
    assert await _in_ann_index(engine, light) == (False, {False})

    vector = (await memory.embedder.embed(["my cat Miso"]))[0]
    exact = await memory.store.query(heavy, vector, 4)
    async with engine.connect() as connection:  # the partial index can serve the search (rolled back below)
        await connection.execute(text("SET LOCAL enable_seqscan = off"))
        await connection.execute(text("ALTER TABLE memories DROP CONSTRAINT uq_memories_user_id_memory_key"))
        await connection.execute(text("DROP INDEX ix_memories_user_id_occurred_at"))
        search = vectors.indexed_search(heavy, 4).compile(dialect=engine.dialect)
        bound = {**search.params, "vector": vector}
        plan = await connection.exec_driver_sql(f"EXPLAIN {search.string}",
                                                tuple(bound[name] for name in search.positiontup or ()))
        assert "Index Scan using ix_memories_embedding" in "\n".join(row[0] for row in plan)
        await connection.rollback()
    monkeypatch.setattr(vectors, "EXACT_SEARCH_LIMIT", 2)
    assert [hit.memory_id for hit in await memory.store.query(heavy, vector, 4)] == [hit.memory_id for hit in exact]


# --- Pinecone ----------------------------------------------------------------------------------------------------


async def test_pinecone_store_keeps_each_user_in_a_namespace_with_provenance(
        repo: MemoryRepository, pinecone_memory: MemoryIndex, pinecone: FakePinecone) -> None:
    mia = await user_with_messages(repo, ["We adopted a cat called Miso", "What a lovely name!",
                                          "She loves the windowsill", "Cats always do."])
    await pinecone_memory.remember_messages(mia, [f"m{mia}-{n}" for n in range(4)], "Mia")
    await pinecone_memory.store.check(384)

    space = pinecone.namespaces[namespace_of(mia)]
    assert len(space) == 4 and pinecone.count(namespace_of(mia) + "x") == 0
    first = min(space.values(), key=lambda vector: len(vector["metadata"]["source_keys"]))
    assert first["metadata"]["source_keys"] == [f"m{mia}-0"] and first["metadata"]["kind"] == "conversation"
    found = await pinecone_memory.search(mia, "what is the cat called?", k=2)
    assert "Miso" in found.hits[0].content and "vector" in found.hits[0].via
    path, body = pinecone.requests[-1]
    assert path == "/query" and body["namespace"] == namespace_of(mia)

    await pinecone_memory.forget(mia, [f"msg:m{mia}-3"])
    assert len(space) == 3
    await pinecone_memory.forget_user(mia)
    assert pinecone.count(namespace_of(mia)) == 0


async def test_pinecone_with_a_wrong_key_or_dimension_is_a_clear_error(engine: AsyncEngine,
                                                                        pinecone: FakePinecone) -> None:
    wrong = PineconeStore.connect("pc-wrong-key", pinecone.url)  # type: ignore[attr-defined]
    with pytest.raises(VectorStoreConnectionError, match="query failed"):
        await wrong.query(1, [0.1] * 384, 3)
    await wrong.close()
    right = PineconeStore.connect(pinecone.api_key, pinecone.url)  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="holds 384-dimensional vectors but the embedder makes 1536"):
        await right.check(1536)
    await right.close()


# --- degradation and forgetting ----------------------------------------------------------------------------------


@ONE_STACK
async def test_with_the_vector_store_down_the_turn_completes_and_keywords_still_recall(
        stack: Stack, engine: AsyncEngine, pinecone: FakePinecone) -> None:
    pinecone.down = True
    store = PineconeStore.connect(pinecone.api_key, pinecone.url)  # type: ignore[attr-defined]
    index = MemoryIndex(create_session_factory(engine), local_embedder(), store)
    down = _own_queue(stack, index, "down")
    mia = new_telegram_id()
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=index)
    async with build_worker(stack.client, down.settings.temporal_task_queue, activities):
        reply = await down.say(mia, "My grandmother's recipe uses saffron and quince.")
        assert not reply.fallback and reply.text.startswith("I hear you")
        user = await stack.repo.get_user_by_telegram_id(mia)
        await eventually(lambda: memory_count(engine, user.id), lambda n: n == 2)  # rows kept without vectors
        second = await down.say(mia, "What was in the recipe?")
        assert not second.fallback
    found = await index.search(user.id, "saffron recipe")
    assert found.degraded and "saffron" in found.hits[0].content and found.hits[0].via == ("keyword",)
    assert pinecone.count(namespace_of(user.id)) == 0

    pinecone.down = False  # back up: reindexing fills in what was missed
    assert await index.reindex(user.id, everything=False) == 4
    assert pinecone.count(namespace_of(user.id)) == 4
    await store.close()


@ONE_STACK
async def test_a_turns_worker_answers_and_leaves_the_remember_step_to_a_background_worker(
        stack: Stack, engine: AsyncEngine, memory: MemoryIndex) -> None:
    split = _own_queue(stack, memory, "roles")
    queue, mia = split.settings.temporal_task_queue, new_telegram_id()
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=memory)
    async with build_worker(stack.client, queue, activities, role="turns"):
        split.started.append(workflow_id(mia))
        reply = await send_message(stack.client, split.settings, split.message(mia, "My cat is called Pixel"))
        assert reply.text == "I hear you: My cat is called Pixel"
        user = await stack.repo.get_user_by_telegram_id(mia)
        await asyncio.sleep(2)
        assert await memory_count(engine, user.id) == 0  # its remember step waits for a worker that runs it
        async with build_worker(stack.client, queue, activities, role="background"):
            first = await eventually(lambda: memory_count(engine, user.id), lambda n: n > 0)
            assert (await split.say(mia, "Pixel is grey")).text == "I hear you: Pixel is grey"
            await eventually(lambda: memory_count(engine, user.id), lambda n: n > first)  # nothing left in flight


@ONE_STACK
async def test_forget_removes_the_users_rows_and_vectors(
        stack: Stack, engine: AsyncEngine, pinecone_memory: MemoryIndex, pinecone: FakePinecone) -> None:
    queue = f"forget-{uuid.uuid4()}"
    settings = stack.settings.model_copy(update={"temporal_task_queue": queue})
    with_pinecone = Stack(stack.client, settings, stack.repo, stack.llm, stack.env, pinecone_memory, stack.started)
    mia, other = new_telegram_id(), new_telegram_id()
    async with build_worker(stack.client, queue, CompanionActivities.create(stack.repo, chat_model(stack.llm),
                                                                     memory=pinecone_memory)):
        for who in (mia, other):
            await with_pinecone.say(who, "I keep bees on my balcony")
            await with_pinecone.say(who, "The queen is called Beatrix")
        user = await stack.repo.get_user_by_telegram_id(mia)
        kept = await stack.repo.get_user_by_telegram_id(other)
        await eventually(lambda: _vectors(pinecone, user.id), lambda n: n == 4)
        await eventually(lambda: _vectors(pinecone, kept.id), lambda n: n == 4)
        forgotten = await forget(stack.client, settings, ChatUser(telegram_id=mia))
    assert forgotten.had_memories
    assert pinecone.count(namespace_of(user.id)) == 0 and await memory_count(engine, user.id) == 0
    assert pinecone.count(namespace_of(kept.id)) == 4 and await memory_count(engine, kept.id) == 4


async def _vectors(pinecone: FakePinecone, user_id: int) -> int:
    return pinecone.count(namespace_of(user_id))


# --- embedders and reindexing ------------------------------------------------------------------------------------


class TinyEmbedder:
    """An 8-dimensional embedder: the letters a text uses, hashed into buckets (enough to rank word overlap)."""

    name = "tiny-8"
    dimension = 8

    async def close(self) -> None:
        pass

    async def embed(self, texts: list[str]) -> list[list[float]]:
        out = []
        for item in texts:
            vector = np.zeros(8)
            for word in item.lower().split():
                vector[sum(map(ord, word)) % 8] += 1
            out.append((vector / (np.linalg.norm(vector) or 1)).tolist())
        return out


async def test_reindex_moves_pgvector_to_another_embedders_dimension(
        repo: MemoryRepository, engine: AsyncEngine, memory: MemoryIndex) -> None:
    mia = await user_with_messages(repo, ["I am learning Portuguese", "Boa sorte!"])
    await memory.remember_messages(mia, [f"m{mia}-0", f"m{mia}-1"], "Mia")
    sessions = create_session_factory(engine)
    tiny = MemoryIndex(sessions, TinyEmbedder(), PgVectorStore(sessions))
    with pytest.raises(EmbedderChangedError, match="embed them again once with `companion memory reindex`"):
        await tiny.store.check(8)

    assert await tiny.reindex() == 2
    await tiny.store.check(8)
    async with engine.connect() as connection:
        dims = (await connection.execute(text("SELECT DISTINCT vector_dims(embedding), embedder FROM memories"))).all()
        assert dims == [(8, "tiny-8")]
    found = await tiny.search(mia, "learning Portuguese")
    assert found.hits and not found.degraded and "vector" in found.hits[0].via
    assert await memory.reindex() == 2  # and back to MiniLM's 384


def test_the_offline_embedder_ranks_meaning_and_is_normalised() -> None:
    embedder = local_embedder()
    vectors = embedder.embed_sync(["I adore my puppy", "I love dogs", "The quarterly tax filing is due"])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > 0.5 > vectors[0] @ vectors[2]
    assert np.allclose(embedder.embed_sync(["I love dogs"])[0], vectors[1], atol=1e-5)  # batching changes nothing


# --- the LoCoMo benchmark ----------------------------------------------------------------------------------------


def _locomo_slice(sessions: int) -> dict:
    """The test conversation cut to its first sessions, with the questions whose evidence lies in them."""
    sample = json.loads(SMALL_CONVERSATION.read_text())[0]
    conversation = {key: value for key, value in sample["conversation"].items()
                    if not key.startswith("session_") or int(key.split("_")[1]) <= sessions}
    keep = {turn["dia_id"] for n in range(1, sessions + 1) for turn in conversation[f"session_{n}"]}
    questions = [q for q in sample["qa"] if q.get("evidence") and set(q["evidence"]) <= keep]
    return {"sample_id": sample["sample_id"], "conversation": conversation, "qa": questions}


async def test_locomo_recall_is_scored_through_provenance(repo: MemoryRepository, memory: MemoryIndex) -> None:
    sample = _locomo_slice(3)
    user_id, dia_of = await load_conversation(repo, memory, sample, new_telegram_id())
    assert len(dia_of) == sum(len(sample["conversation"][f"session_{n}"]) for n in (1, 2, 3))
    # Memories are stretches of a few turns, so a short conversation is covered by ten of them: score the top few.
    ks = (1, 3, 5)
    results = new_results(ks, headline=3)
    await score(memory, user_id, dia_of, sample["qa"], results, ks)
    figures = summary(results, ks, headline=3)
    assert figures["questions"] == len([q for q in sample["qa"] if q["category"] in (1, 2, 3, 4)]) > 10
    assert figures["recall@1"] <= figures["recall@3"] <= figures["recall@5"]
    assert figures["recall@5"] >= 0.8  # 0.89 with the local embedder


def test_locomo_evidence_listing_two_turns_in_one_entry_counts_both() -> None:
    # The dev data has one such entry ("D8:6; D9:17"): read whole, it named no turn and the question scored 0.
    assert evidence_turns({"evidence": ["D8:6; D9:17", " D1:3 "]}) == {"D8:6", "D9:17", "D1:3"}
    assert evidence_turns({"evidence": []}) == evidence_turns({}) == set()


def test_companion_bench_locomo_prints_its_figures_as_json(database_url: str, tmp_path: Path) -> None:
    data = tmp_path / "locomo.json"
    data.write_text(json.dumps([_locomo_slice(2)]))
    env = {**os.environ, "DATABASE_URL": libpq_url(database_url), "LOG_LEVEL": "WARNING",
           "MEMORY_PROMPT_TOKENS": "400"}
    done = subprocess.run([sys.executable, "-m", "cli", "bench", "locomo", "--data", str(data), "--k", "7"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"recall@5", "recall@7", "recall@10", "recall@20", "recall@7_temporal", "questions", "p50_ms",
            "p95_ms"} <= set(figures)
    assert figures["questions"] > 5 and 0 < figures["recall@7"] <= 1 and figures["conversations"] == 1
    # The prompt a reply to each question would get, its memory within MEMORY_PROMPT_TOKENS (400 here).
    assert 0 < figures["memory_tokens_p50"] <= figures["memory_tokens_p95"] <= 400
    assert 0 < figures["recall_prompt"] <= 1  # the share of the evidence that prompt holds
    assert figures["memory_tokens_p95"] < figures["prompt_tokens_p95"] and "J" not in figures

    offline = subprocess.run([sys.executable, "-m", "cli", "bench", "locomo", "--data", str(data), "--answer"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert offline.returncode != 0 and offline.stderr.count("\n") == 1
    assert "--answer needs an OpenAI-compatible model" in offline.stderr

    bad = subprocess.run([sys.executable, "-m", "cli", "bench", "locomo", "--data", str(tmp_path / "none.json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "cannot read LoCoMo data" in bad.stderr


async def test_locomo_answer_mode_answers_from_the_prompts_memory_and_a_judge_grades_it(
        database_url: str, tmp_path: Path, fake_llm: FakeOpenAI, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sample = _locomo_slice(2)
    data = tmp_path / "locomo.json"
    data.write_text(json.dumps([sample]))
    asked = [q for q in sample["qa"] if q["category"] in (1, 2, 3, 4) and q.get("evidence")]
    monkeypatch.setattr(fake_llm, "default", lambda body: f"answer {len(fake_llm.requests)}")  # this test's only
    # The judge grades every third answer WRONG; verdicts come in the order the judge is asked.
    fake_llm.script_json(*({"reason": "same point" if n % 3 else "misses it", "label": "CORRECT" if n % 3 else
                            "WRONG"} for n in range(len(asked))))
    settings = load_settings(database_url=database_url, openai_api_key="sk-test-key", openai_base_url=fake_llm.url,
                             openai_chat_model="answer-model", embedding_provider="local")

    assert await run_locomo(settings, data, answer=True, judge_model="judge-model") == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    answers = [r for r in fake_llm.requests if not r.get("response_format")]
    verdicts = [r for r in fake_llm.requests if r.get("response_format")]
    assert len(answers) == len(verdicts) == len(asked) == figures["questions"]
    assert {r["model"] for r in answers} == {"answer-model"} and {r["model"] for r in verdicts} == {"judge-model"}
    questions = {q["question"] for q in asked}
    for request in answers:  # the question last, after the quoted memories recalled for it
        assert request["messages"][0]["content"].startswith("You answer questions about a long conversation")
        assert request["messages"][-1]["content"] in questions and MEMORY_OPEN in request["messages"][-2]["content"]
    golds = {json.dumps(str(q["answer"])) for q in asked}
    for request in verdicts:
        schema = request["response_format"]["json_schema"]
        assert schema["strict"] is True and schema["schema"]["properties"]["label"]["enum"] == ["CORRECT", "WRONG"]
        graded = request["messages"][1]["content"]
        assert graded.split("\nGold answer: ")[1].split("\nGenerated answer: ")[0] in golds
        assert re.search(r'Generated answer: "answer \d+"$', graded)
    correct = len([n for n in range(len(asked)) if n % 3])
    assert figures["J"] == round(correct / len(asked), 4)
    assert figures["judge_model"] == "judge-model" and figures["answer_model"] == "answer-model"
    # J per category: each the share of its questions graded correct, together the overall J.
    names = {1: "multi_hop", 2: "temporal", 3: "open_domain", 4: "single_hop"}
    counts = Counter(names[q["category"]] for q in asked)
    assert {name for name in names.values() if figures[f"J_{name}"] is not None} == set(counts)
    assert sum(figures[f"J_{name}"] * n for name, n in counts.items()) == pytest.approx(correct, abs=0.01)


async def test_openai_embeddings_are_used_when_configured(repo: MemoryRepository, engine: AsyncEngine,
                                                          fake_llm: FakeOpenAI) -> None:
    settings = load_settings(openai_api_key="sk-test-key", openai_base_url=fake_llm.url)
    embedder = create_embedder(settings)
    assert (embedder.name, embedder.dimension) == ("text-embedding-3-small", 1536)
    sessions = create_session_factory(engine)
    index = MemoryIndex(sessions, embedder, PgVectorStore(sessions))
    await index.store.check(embedder.dimension)  # an empty column is fitted to the embedder, no reindex needed
    mia = await user_with_messages(repo, ["My favourite tea is genmaicha", "Toasty and nutty!"])
    await index.remember_messages(mia, [f"m{mia}-0", f"m{mia}-1"], "Mia")
    found = await index.search(mia, "favourite tea")
    assert "genmaicha" in found.hits[0].content and "vector" in found.hits[0].via
    embedded = [r for r in fake_llm.requests if r.get("input")]
    assert embedded[0]["model"] == "text-embedding-3-small" and len(embedded[0]["input"]) == 2
    await embedder.close()


async def test_doctor_checks_the_embedder_and_the_pinecone_index(pinecone: FakePinecone) -> None:
    settings = load_settings(pinecone_api_key=pinecone.api_key, pinecone_host=pinecone.url)  # type: ignore[attr-defined]
    embedder, index = await check_memory(settings)
    assert (embedder.ok, embedder.detail) == (True, "all-MiniLM-L6-v2-int8, 384 dimensions")
    assert index.ok and index.detail.endswith("384 dimensions")

    wrong = settings.model_copy(update={"pinecone_api_key": SecretStr("pc-wrong")})
    _, refused = await check_memory(wrong)
    assert not refused.ok and "384 dimensions, cosine" in refused.fix


_WORDS = st.sampled_from(["pin", "bank", "giraffe", "blue", "doctor", "sister", "Lisbon", "piano", "cat", "Miso",
                          "bees", "queen", "tea", "hike", "Alps", "job", "Acme", "Globex", "secret", "birthday"])
_LINE = st.lists(_WORDS, min_size=1, max_size=8).map(" ".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mine=st.lists(_LINE, min_size=1, max_size=4), theirs=st.lists(_LINE, min_size=1, max_size=4),
       query=_LINE)
async def test_property_a_users_recall_holds_only_their_own_memories(
        repo: MemoryRepository, memory: MemoryIndex, mine: list[str], theirs: list[str], query: str) -> None:
    me = await user_with_messages(repo, mine)
    other = await user_with_messages(repo, theirs)
    await memory.remember_messages(me, [f"m{me}-{n}" for n in range(len(mine))], "me")
    await memory.remember_messages(other, [f"m{other}-{n}" for n in range(len(theirs))], "them")
    found = await memory.search(me, query, k=50)
    assert all(key.startswith(f"m{me}-") for hit in found.hits for key in hit.source_keys)
    assert len(found.hits) <= len(mine)


# Two vocabularies no prompt scaffolding uses: one user's words, and another's, which must never reach the first's.
_OWN_WORDS = ["zaphira", "quellmoor", "brindlewick", "tovaskar", "mirelune", "gastrolith", "pellucid", "orrin"]
_OTHER_WORDS = ["vexdrall", "kroomba", "sibberish", "thrandolin", "wuzzlepod", "yarrowmere", "plinketh", "jorvath"]
_OWN_LINE = st.lists(st.sampled_from(_OWN_WORDS), min_size=1, max_size=6).map(" ".join)
_OTHER_LINE = st.lists(st.sampled_from(_OTHER_WORDS), min_size=1, max_size=6).map(" ".join)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mine=st.lists(_OWN_LINE, min_size=1, max_size=4), theirs=st.lists(_OTHER_LINE, min_size=1, max_size=4),
       their_fact=_OTHER_LINE, query=st.lists(st.sampled_from(_OWN_WORDS + _OTHER_WORDS), min_size=1,
                                               max_size=6).map(" ".join))
async def test_property_a_users_prompt_holds_nothing_of_another_user(
        repo: MemoryRepository, memory: MemoryIndex, fake_llm: FakeOpenAI, mine: list[str], theirs: list[str],
        their_fact: str, query: str) -> None:
    me = await user_with_messages(repo, mine)
    other = await user_with_messages(repo, theirs)
    await memory.remember_messages(me, [f"m{me}-{n}" for n in range(len(mine))], "me")
    await memory.remember_messages(other, [f"m{other}-{n}" for n in range(len(theirs))], "them")
    # Everything the prompt can draw on, for the other user: a fact, an event, a milestone, recallable memories.
    when = datetime.now(UTC) + timedelta(days=2)
    await repo.upsert_profile_fact(other, ProfileFactCreate(category=FactCategory.HOBBIES, key="hobby",
                                                            value=their_fact, source_keys=[f"m{other}-0"]))
    await repo.add_timeline_event(other, TimelineEventCreate(title=their_fact, event_at=when,
                                                             source_keys=[f"m{other}-0"]))
    await repo.add_diary_entry(other, DiaryEntryCreate(title=their_fact, content=their_fact, occurred_at=when,
                                                       source_keys=[f"m{other}-0"]))
    await memory.add(other, [NewMemory(key=f"fact-{other}", kind=MemoryKind.FACT, content=their_fact,
                                       occurred_at=when, source_keys=[f"m{other}-0"])])

    activities = ReplyActivities(repo, chat_model(fake_llm), memory)
    prompt = await activities.prompt_for(GenerateReplyInput(
        user_id=me, message_key=f"m{me}-q", reply_key=f"m{me}-q:reply", text=query, channel=Channel.CONSOLE))
    shown = "\n".join([prompt.system_prompt, *(turn.content for turn in prompt.history)])
    assert not [word for word in _OTHER_WORDS if word in shown]
    assert mine[-1] in shown  # the user's own conversation is there


@ONE_STACK
async def test_turns_answered_while_a_remember_step_runs_are_remembered_together_by_the_next(
        stack: Stack, engine: AsyncEngine, memory: MemoryIndex) -> None:
    extracting = _own_queue(stack, memory, "remember")
    mia = new_telegram_id()
    # The first turn's extraction is slow; the user writes three more messages meanwhile.
    stack.llm.script_json(Reply(json.dumps({"facts": [], "events": [], "milestones": [], "reminders": [],
                                            "summary": "Mia is planning a trip to Lisbon."}), delay_s=3),
                          {"facts": [], "events": [], "milestones": [], "reminders": [],
                           "summary": "Mia is planning a trip to Lisbon with her sister in May."})
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=memory, extract=True)
    async with build_worker(stack.client, extracting.settings.temporal_task_queue, activities):
        first = extracting.message(mia, "I'm planning a trip to Lisbon.")
        await extracting.signal(first)
        later = [extracting.message(mia, text) for text in ["With my sister.", "In May.", "Any tips?"]]
        await eventually(lambda: extracting.state(mia), lambda state: len(state.replies) == 1)
        for message in later:
            await extracting.signal(message)
        state = await eventually(lambda: extracting.state(mia), lambda state: "sister" in state.summary,
                                 timeout_s=30)
        assert len(state.replies) == 4

    steps = _remember_steps((await extracting.handle(mia).fetch_history()).events)
    assert [(step["message_key"], step["earlier"]) for step in steps] == [
        (first.message_key, []), (later[-1].message_key, [later[0].message_key, later[1].message_key])]
    assert steps[1]["summary"] == "Mia is planning a trip to Lisbon."  # each step starts from the last one's

    structured = [r for r in stack.llm.requests if r.get("response_format")]
    assert len(structured) == 2  # one extraction for the three turns
    assert structured[1]["messages"][1]["content"].count("NEW ") == 6  # their messages and replies
    remembered = await _conversation_sources(engine, stack.repo, mia)
    for message in [first, *later]:
        assert {message.message_key, message.reply_key} <= remembered


# --- the remember step waits for a pause ---------------------------------------------------------------------------


QUIET_STACK = pytest.mark.parametrize("stack", ["time-skipping", "time-skipping-uncached"], indirect=True)


def _user_remembered_after_ten_quiet_minutes(stack: Stack) -> int:
    """A new user, whose turns the remember step takes once they have been quiet for ten minutes (or five wait)."""
    stack.settings = stack.settings.model_copy(update={"remember_after_quiet_seconds": 600})
    return new_telegram_id()


@QUIET_STACK
async def test_a_conversation_is_remembered_in_one_step_once_the_user_pauses(
        stack: Stack, engine: AsyncEngine) -> None:
    ana = _user_remembered_after_ten_quiet_minutes(stack)
    await stack.say(ana, "My cat is called Pixel.")
    await stack.say(ana, "She is three.")
    await stack.say(ana, "What is my cat called?")
    # Nothing is indexed yet, but the earlier turns are in the prompt's recent conversation.
    assert await _conversation_sources(engine, stack.repo, ana) == set()
    assert "My cat is called Pixel." in json.dumps(stack.llm.requests[-1]["messages"])
    state = await stack.state(ana)

    await stack.env.sleep(timedelta(minutes=9))  # not quiet for long enough yet
    assert _remember_steps((await stack.handle(ana).fetch_history()).events) == []
    await stack.env.sleep(timedelta(minutes=2))
    await eventually(lambda: _conversation_sources(engine, stack.repo, ana), lambda sources: bool(sources))

    events = (await stack.handle(ana).fetch_history()).events
    [step] = _remember_steps(events)
    turns = [*step["earlier"], step["message_key"]]
    assert len(turns) == 3 and turns == [reply.message_key for reply in state.replies]
    # Each turn moved the pause's end later; the timer counting it was kept (and set again when it rang early, then
    # to the check-in once the step began) rather than cancelled and started anew at every turn.
    started = [event for event in events if event.HasField("timer_started_event_attributes")]
    assert not [event for event in events if event.HasField("timer_canceled_event_attributes")]
    assert 1 <= len(started) <= 3
    # Dates in the conversation are read as of its last turn, not ten minutes later.
    assert datetime.fromisoformat(step["now"]) == state.last_turn_at
    assert set(turns) | {f"{key}:reply" for key in turns} <= await _conversation_sources(engine, stack.repo, ana)


@QUIET_STACK
async def test_five_turns_without_a_pause_are_remembered_at_once(stack: Stack) -> None:
    ana = _user_remembered_after_ten_quiet_minutes(stack)
    for n in range(5):
        await stack.say(ana, f"message {n}")
    [step] = _remember_steps((await stack.handle(ana).fetch_history()).events)
    assert len(step["earlier"]) == 4
    await stack.say(ana, "message 5")  # the next batch waits for a pause again
    assert len(_remember_steps((await stack.handle(ana).fetch_history()).events)) == 1


@QUIET_STACK
async def test_turns_waiting_to_be_remembered_are_remembered_before_the_run_continues_as_new(
        stack: Stack, engine: AsyncEngine, memory: MemoryIndex) -> None:
    extracting = _own_queue(stack, memory, "quiet")
    extracting.settings = extracting.settings.model_copy(update={"remember_after_quiet_seconds": 600,
                                                                 "workflow_turns_per_run": 7})
    ana = new_telegram_id()
    empty = {"facts": [], "events": [], "milestones": [], "reminders": []}
    # The step the fifth turn starts (five turns wait) is slow; the sixth and seventh are answered meanwhile, and
    # the seventh ends the run.
    stack.llm.script_json(Reply(json.dumps({**empty, "summary": "Ana has a cat."}), delay_s=3),
                          {**empty, "summary": "Ana has a cat called Pixel."})
    activities = CompanionActivities.create(stack.repo, chat_model(stack.llm), memory=memory, extract=True)
    async with build_worker(stack.client, extracting.settings.temporal_task_queue, activities):
        for n in range(4):
            await extracting.say(ana, f"message {n}", key=f"console:{ana}:{n}")
        first_run = (await extracting.handle(ana).describe()).run_id
        for n in (4, 5, 6):
            await extracting.signal(extracting.message(ana, f"message {n}", key=f"console:{ana}:{n}"))
        # A new run, carrying the last step's summary (the old run may answer a query just before it ends).
        state = await eventually(lambda: extracting.state(ana),
                                 lambda state: state.turns_this_run == 0 and "Pixel" in state.summary, timeout_s=30)
        assert state.turns == 7

    history = await stack.client.get_workflow_handle(workflow_id(ana), run_id=first_run).fetch_history()
    steps = _remember_steps(history.events)
    assert [(step["message_key"], step["earlier"]) for step in steps] == [
        (f"console:{ana}:4", [f"console:{ana}:{n}" for n in range(4)]), (f"console:{ana}:6", [f"console:{ana}:5"])]
    assert len(await _conversation_sources(engine, stack.repo, ana)) == 14  # every message and reply


@QUIET_STACK
async def test_turns_waiting_to_be_remembered_are_forgotten_with_the_rest(
        stack: Stack, engine: AsyncEngine) -> None:
    ana = _user_remembered_after_ten_quiet_minutes(stack)
    await stack.say(ana, "My cat is called Pixel.")
    await forget(stack.client, stack.settings, ChatUser(telegram_id=ana))
    await stack.say(ana, "Hello again.", key=f"console:{ana}:hello")
    await stack.env.sleep(timedelta(minutes=11))
    await eventually(lambda: _conversation_sources(engine, stack.repo, ana), lambda sources: bool(sources))
    [step] = _remember_steps((await stack.handle(ana).fetch_history()).events)
    assert (step["message_key"], step["earlier"]) == (f"console:{ana}:hello", [])


async def test_forgetting_an_event_or_a_diary_entry_removes_it_and_the_memories_that_repeat_it(
        repo: MemoryRepository, memory: MemoryIndex) -> None:
    user_id = await user_with_messages(repo, ["My sister's wedding is on June 6", "How lovely!",
                                              "I also got promoted today", "Congratulations!"])
    await memory.remember_messages(user_id, [f"m{user_id}-{n}" for n in range(4)], "Mia")
    wedding = await repo.add_timeline_event(user_id, TimelineEventCreate(
        title="sister's wedding", event_at=datetime(2031, 6, 6, 14, tzinfo=UTC), source_keys=[f"m{user_id}-0"],
        idempotency_key="xevent-wedding"))
    promotion = await repo.add_diary_entry(user_id, DiaryEntryCreate(
        title="promoted", content="Mia got promoted", source_keys=[f"m{user_id}-2"], idempotency_key="diary-promo",
        occurred_at=datetime(2026, 5, 1, 18, 2, tzinfo=UTC)))
    await memory.add(user_id, [
        NewMemory(key="event:xevent-wedding", kind=MemoryKind.EVENT, content="2031-06-06 14:00: sister's wedding",
                  occurred_at=wedding.event_at, source_keys=wedding.source_keys),
        NewMemory(key="diary:diary-promo", kind=MemoryKind.DIARY, content="promoted: Mia got promoted",
                  occurred_at=promotion.occurred_at, source_keys=promotion.source_keys)])
    items = await repo.memory_items(user_id, now=datetime(2026, 5, 2, tzinfo=UTC))
    assert [(item.ref, item.source) for item in items] == [
        (f"event:{wedding.id}", "My sister's wedding is on June 6"),
        (f"diary:{promotion.id}", "I also got promoted today")]

    # The event's own memory and every conversation memory that says "sister's wedding" go; recall finds neither.
    await repo.forget_memory_item(user_id, f"event:{wedding.id}")
    left = [hit.content for hit in (await memory.search(user_id, "sister's wedding in June", k=20)).hits]
    assert left and not any("wedding" in content for content in left)
    assert "promoted: Mia got promoted" in left  # the diary's own memory stays
    assert [item.ref for item in await repo.memory_items(user_id)] == [f"diary:{promotion.id}"]

    await repo.forget_memory_item(user_id, f"diary:{promotion.id}")
    assert await repo.memory_items(user_id) == []
    assert not any("promoted" in hit.content for hit in (await memory.search(user_id, "promoted", k=20)).hits)
    with pytest.raises(RecordNotFoundError):
        await repo.forget_memory_item(user_id, f"diary:{promotion.id}")
    with pytest.raises(InvalidMemoryDataError):
        await repo.forget_memory_item(user_id, "user:1")
