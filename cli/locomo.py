"""`companion bench locomo`: evidence recall of memory retrieval on LoCoMo long conversations.

Each conversation is loaded into a fresh user's memory through the code the remember step uses: every turn is stored
as a message (speaker_a is the user, speaker_b the companion, each message at its session's date), then remembered as
stretches of conversation; with --extract, the LLM extraction of the remember step runs over each session too. Then,
for every question of categories 1-4, the top k memories are retrieved for the question, and recall is the share of
its evidence turns those memories cover through their provenance. For each question, the prompt a reply would get
(the memory fitted to MEMORY_PROMPT_TOKENS, the recent conversation at the conversation's end) is built, its tokens
counted and the share of the evidence it holds taken (recall_prompt: what the model would see). With --answer, a
configured OpenAI-compatible model answers each question from that prompt's memory and a judge model (--judge-model,
else the same) grades it CORRECT or WRONG against the gold answer: J is the share graded correct, as the mem0 paper
reports it. The last line printed is one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from activities.prompt import HISTORY_TURNS, build_prompt, fit_memory
from clients.llm import ChatModel, PromptBudget, chat_messages, create_chat_model, prompt_budget
from core.errors import ConfigurationError, InvalidInputError, OpenAIServiceError
from core.settings import Settings
from schemas.context import UserContextSchema, quote
from schemas.memory import Channel, MessageCreate, Role, UserCreate
from schemas.turn import TurnContext
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


def evidence_turns(question: dict[str, Any]) -> set[str]:
    """The dia_ids of a question's evidence turns; an entry may list several ("D8:6; D9:17": the data has one)."""
    return {turn.strip() for entry in question.get("evidence") or [] for turn in str(entry).split(";")
            if turn.strip()}


def ended(sample: dict[str, Any]) -> datetime:
    """When the conversation's last turn was said: the questions are asked after it."""
    return session_turns(sample, "end")[-1][-1].at


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


@dataclass
class Answering:
    """The answer mode: a model answers each question from the memory its prompt would hold, and a judge grades the
    answer against the gold one, CORRECT or WRONG (the LLM-judge protocol of the mem0 paper)."""

    model: ChatModel
    judge: ChatModel

    async def grade(self, question: str, gold: str, context: UserContextSchema, prompt: TurnContext) -> bool:
        profile = context.to_prompt_context(include_messages=False, include_recalled=False)
        asked = prompt.model_copy(update={"system_prompt": f"{ANSWER_PROMPT}\n\n{profile}"})
        answer = (await self.model.reply(asked, question)).text
        raw = await self.judge.complete_json(JUDGE_PROMPT, JUDGE_INPUT.format(
            question=quote(question), gold=quote(gold), answer=quote(answer)), "verdict", VERDICT_SCHEMA,
            JUDGE_MAX_TOKENS)
        try:
            label = json.loads(raw)["label"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OpenAIServiceError("the judge's verdict is not the JSON asked for", context={"verdict": raw[:200]}
                                     ) from exc
        return str(label).strip().upper() == "CORRECT"


ANSWER_PROMPT = ("You answer questions about a long conversation between two people, one of them the user named in "
                 "the memory below, from what you remember of it: the quoted memories (each with when it was said) "
                 "and the recent conversation. Answer in a short phrase, with dates as the memories give them; if "
                 "the memories don't say, answer that you don't know.")
JUDGE_PROMPT = ("You grade an answer to a question about a conversation between two people. You get the question, "
                "the gold answer and a generated answer. The generated answer is CORRECT when it says what the gold "
                "answer says, even in other words, at greater length or in another date format (a relative time "
                "such as 'last Tuesday' is correct when it names the same date or period); it is WRONG when it "
                "misses the gold answer's point, contradicts it or says it does not know. Give a one-sentence "
                "reason, then the label.")
JUDGE_INPUT = "Question: {question}\nGold answer: {gold}\nGenerated answer: {answer}"
VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["reason", "label"],
                  "properties": {"reason": {"type": "string"},
                                 "label": {"type": "string", "enum": ["CORRECT", "WRONG"]}}}
JUDGE_MAX_TOKENS = 200
# A chat message costs a few tokens of its own beside its text.
MESSAGE_TOKENS = 4
ANSWERING_AT_ONCE = 4


async def score(index: MemoryIndex, user_id: int, dia_of: dict[str, str], questions: list[dict[str, Any]],
                results: dict[str, Any], ks: tuple[int, ...] = KS, asked_at: datetime | None = None,
                context: UserContextSchema | None = None, budget: PromptBudget = PromptBudget(),
                answering: Answering | None = None) -> None:
    """Retrieve for each question of categories 1-4 and add its recall at each k to ``results``; a question that
    names a time ("last week") reads it as of ``asked_at`` (the conversation's end), in UTC like the sessions.

    With the user's ``context``, the prompt a reply to the question would get is built within ``budget`` and its
    tokens counted (the memory block and the whole prompt); with ``answering``, each question is then answered from
    that prompt's memory and the answer graded."""
    graded: list[tuple[int, str, str, UserContextSchema, TurnContext]] = []
    for question in questions:
        category = question.get("category")
        evidence = evidence_turns(question)
        if category not in CATEGORIES or not evidence:
            continue
        text = str(question["question"])
        started = time.perf_counter()  # reading the time the question names is part of retrieval
        when = await index.time_named(user_id, text, asked_at, ZoneInfo("UTC")) if asked_at else None
        found = await index.search(user_id, text, k=max(ks), when=when)
        results["latency_ms"].append((time.perf_counter() - started) * 1000)
        for k in ks:
            covered = {dia_of.get(key) for hit in found.hits[:k] for key in hit.source_keys}
            recall = len(evidence & covered) / len(evidence)
            results["recall"][k].append(recall)
            if k == results["headline"]:
                results["by_category"][category].append(recall)
        if context is None:
            continue
        mine = context.model_copy(deep=True)
        shown = {m.message_key for m in mine.recent_messages}
        fitted = fit_memory(mine, found.hits, shown, budget)
        seen = {dia_of.get(key) for key in shown | {key for hit in fitted for key in hit.source_keys}}
        results["prompt_recall"].append(len(evidence & seen) / len(evidence))
        prompt = build_prompt(mine, message_key="", budget=budget)
        results["memory_tokens"].append(budget.count(mine.memory_block()))
        results["prompt_tokens"].append(sum(budget.count(message["content"]) + MESSAGE_TOKENS
                                            for message in chat_messages(prompt, text)))
        graded.append((category, text, str(question.get("answer", "")), mine, prompt))
    if answering is not None:
        at_once = asyncio.Semaphore(ANSWERING_AT_ONCE)

        async def judged(category: int, text: str, gold: str, mine: UserContextSchema, prompt: TurnContext) -> None:
            async with at_once:
                results["judged"][category].append(await answering.grade(text, gold, mine, prompt))

        await asyncio.gather(*(judged(*item) for item in graded))


def summary(results: dict[str, Any], ks: tuple[int, ...] = KS, headline: int = 10) -> dict[str, Any]:
    latency = sorted(results["latency_ms"])

    def mean(values: list[float]) -> float | None:  # None: no question of that kind
        return round(statistics.fmean(values), 4) if values else None

    out: dict[str, Any] = {f"recall@{k}": mean(results["recall"][k]) for k in ks}
    out.update({f"recall@{headline}_{name}": mean(results["by_category"][c]) for c, name in CATEGORIES.items()})
    out["questions"] = len(results["recall"][headline])
    out["p50_ms"] = round(statistics.median(latency), 2) if latency else 0.0
    out["p95_ms"] = _p95(latency)
    if results["prompt_recall"]:
        out["recall_prompt"] = mean(results["prompt_recall"])
    for name in ("memory_tokens", "prompt_tokens"):
        if results[name]:
            out[f"{name}_p50"] = statistics.median(results[name])
            out[f"{name}_p95"] = _p95(sorted(results[name]))
    judged = [verdict for verdicts in results["judged"].values() for verdict in verdicts]
    if judged:
        out["J"] = mean([float(v) for v in judged])
        out.update({f"J_{name}": mean([float(v) for v in results["judged"][c]]) for c, name in CATEGORIES.items()})
    return out


def _p95(ordered: list[float]) -> float:
    return round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2) if ordered else 0.0


def new_results(ks: tuple[int, ...] = KS, headline: int = 10) -> dict[str, Any]:
    return {"recall": {k: [] for k in ks}, "by_category": {c: [] for c in CATEGORIES}, "latency_ms": [],
            "headline": headline, "memory_tokens": [], "prompt_tokens": [], "prompt_recall": [],
            "judged": {c: [] for c in CATEGORIES}}


async def run_locomo(settings: Settings, path: Path, k: int = 10, extract: bool = False, answer: bool = False,
                     judge_model: str | None = None) -> int:
    """Load every conversation of the file into fresh users, score retrieval (and, with ``answer``, the answers a
    configured model gives from it, graded by ``judge_model``), print figures, then erase the users."""
    if answer and settings.uses_local_model:
        raise ConfigurationError("--answer needs an OpenAI-compatible model to answer and grade: set OPENAI_API_KEY "
                                 "(or OPENAI_BASE_URL); the embedded model is too small to be judged fairly")
    conversations = read_conversations(path)
    ks = tuple(sorted({*KS, k}))
    budget = prompt_budget(settings)
    with postgres_url(settings) as url:
        engine = create_engine(url)
        index = chat = None
        models: list[ChatModel] = []
        try:
            await migrate.upgrade(engine)
            sessions = create_session_factory(engine)
            repo = MemoryRepository(sessions)
            index = create_memory_index(settings, sessions)
            await index.store.check(index.embedder.dimension)
            extractor, chat = await _extractor(settings, repo, index) if extract else (None, None)
            answering = None
            if answer:
                judge = settings.model_copy(update={"openai_chat_model": judge_model or settings.openai_chat_model})
                models = [create_chat_model(settings), create_chat_model(judge)]
                answering = Answering(model=models[0], judge=models[1])
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
                    asked_at = ended(sample)
                    context = await repo.get_user_context(user_id, message_limit=HISTORY_TURNS + 1, now=asked_at)
                    await score(index, user_id, dia_of, sample["qa"], results, ks, asked_at=asked_at,
                                context=context, budget=budget, answering=answering)
                finally:
                    await index.forget_user(user_id)
                    await repo.delete_user_by_telegram_id(telegram_id)
            figures = summary(results, ks, k)
            figures.update({"conversations": len(conversations), "turns": loaded, "k": k, "extract": extract,
                            "embedder": index.embedder.name, "store": index.store.name,
                            "memory_prompt_tokens": budget.memory_tokens})
            if answering is not None:
                figures.update({"answer_model": answering.model.model, "judge_model": answering.judge.model})
            print(json.dumps(figures))
        finally:
            for model in models:
                await model.close()
            if chat is not None:
                await chat.close()
            if index is not None:
                await index.close()
            await engine.dispose()
    return 0


async def _extractor(settings: Settings, repo: MemoryRepository, index: MemoryIndex):
    from activities.remember import Rememberer
    from clients.llm import LocalModelServer

    local = LocalModelServer() if settings.uses_local_model else None
    chat = create_chat_model(settings, local.start() if local else None)
    rememberer = Rememberer(repo, index, chat)
    rememberer.keep_alive = local  # the local model's server lives as long as this object

    async def extract(user_id: int, keys: list[str]) -> None:
        await rememberer.extract_and_apply(user_id, keys)

    return extract, chat
