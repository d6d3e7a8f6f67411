"""Streaming: how soon a Telegram user sees the reply of a model that takes its time.

    uv run python -m bench.stream [--users 50] [--messages 5] [--first-token-s 0.5] [--tokens-per-s 50]
                                  [--tokens 150]

Embedded stack (bench.stack: PostgreSQL, the Temporal dev server, the worker processes as docker compose runs them:
two for turns, one for the background) delivering to the local Bot API server of the tests. The OpenAI-compatible
stub streams every reply of --tokens tokens with a time to first token and a pace, and notes when it wrote each
reply's first and last token. Every user writes --messages messages in a private chat, each once the reply to the
previous one has arrived, as the gateway signals them; the users start spread over the time a reply takes. For
each message:

    first visible overhead  when the chat first showed text of the reply (its first draft, or the message itself)
                            after the model wrote the reply's first token;
    final overhead          when the message arrived after the model wrote the reply's last token.

The same load runs twice in one run: streamed (LLM_STREAM=true: drafts while the reply is written), then not
(LLM_STREAM=false: the reply is sent once written). Lost: messages with no reply; duplicated: messages beyond one a
message. Cores busy: the CPU the whole stack used (the stub and this process included) over the pass's time. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.probe import cpu_probe_s
from bench.stack import embedded_stack
from bench.turn import _percentile
from core.logging import configure_logging
from schemas.memory import Channel
from schemas.turn import ChatUser, IncomingMessage
from tests.fake_telegram import TOKEN, FakeBotAPI
from workflows.client import signal_message

FIRST_USER = 30_000_000
WORDS = ("the quiet river runs past our old house where we used to sit and talk about the day and what the "
         "week would bring").split()


def _text(user: int, n: int, tokens: int) -> str:
    """A message the stub's reply ("I hear you: " and the message) makes ``tokens`` tokens (words) long."""
    filler = itertools.islice(itertools.cycle(WORDS), tokens - 7)  # 3 words of "I hear you:", 4 of the head
    return f"message {n} from {user}: " + " ".join(filler)


async def _run(streamed: bool, users: int, messages: int, first_token_s: float, tokens_per_s: float,
               tokens: int) -> dict[str, Any]:
    """One pass of the load; the figures of its messages."""
    api = FakeBotAPI()
    api.start()
    log = Path(tempfile.mkdtemp(prefix="companion-stream-")) / "streams.jsonl"
    worker_env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": api.url, "MEMORY_EXTRACTION": "off",
                  "LLM_STREAM": "true" if streamed else "false"}
    llm_args = ("--first-token-s", str(first_token_s), "--tokens-per-s", str(tokens_per_s), "--streams-log", str(log))
    sent: dict[str, tuple[int, int, float]] = {}  # message text -> (user, n, when it was signalled)
    try:
        async with embedded_stack(f"bench-stream-{streamed}", worker_env, workers=2, background_workers=1,
                                  llm_args=llm_args) as stack:

            async def conversation(user: int, start_after_s: float) -> None:
                await asyncio.sleep(start_after_s)
                for n in range(messages):
                    text = _text(user, n, tokens)
                    sent[text] = (user, n, time.perf_counter())
                    await signal_message(stack.client, stack.settings, IncomingMessage(
                        message_key=f"tg:{user}:{n}", user=ChatUser(telegram_id=user, first_name="Load"),
                        chat_id=user, channel=Channel.TELEGRAM, text=text, sent_at=datetime.now(UTC)))
                    await api.wait_for(user, n + 1, timeout=120)

            cpu_before, started = stack.cpu_seconds(), time.perf_counter()
            # The users start spread over the time the model takes to write a reply, as people write at any moment.
            writing_s = first_token_s + tokens / tokens_per_s
            await asyncio.gather(*(conversation(FIRST_USER + u, writing_s * u / users) for u in range(users)))
            await asyncio.sleep(1)  # a duplicate would arrive by now
            cpu_after, elapsed = stack.cpu_seconds(), time.perf_counter() - started
        streams: dict[str, tuple[float, float]] = {}
        for line in log.read_text().splitlines():
            stream = json.loads(line)
            first, last = streams.get(stream["message"], (stream["first_token_at"], 0.0))
            streams[stream["message"]] = (min(first, stream["first_token_at"]), max(last, stream["last_token_at"]))
    finally:
        api.stop()
    first_visible, final = [], []
    for text, (user, n, signalled) in sent.items():
        reply = api.messages(user)[n]
        drafts = [draft.received_at for draft in api.drafts
                  if draft.chat_id == user and signalled < draft.received_at < reply.received_at]
        first_token, last_token = streams[text]
        first_visible.append((min([*drafts, reply.received_at]) - first_token) * 1000)
        final.append((reply.received_at - last_token) * 1000)
    lost = sum(len(api.messages(FIRST_USER + u)) < messages for u in range(users))
    duplicated = sum(max(len(api.messages(FIRST_USER + u)) - messages, 0) for u in range(users))
    return {"first_visible_p50_ms": round(statistics.median(first_visible), 1),
            "first_visible_p95_ms": round(_percentile(first_visible, 0.95), 1),
            "final_p50_ms": round(statistics.median(final), 1), "final_p95_ms": round(_percentile(final, 0.95), 1),
            "worker_cpu_ms_per_turn": round((cpu_after["worker"] - cpu_before["worker"]) * 1000 / len(sent), 1),
            # Of the machine's cores, how many the stack kept busy (the stub and this process included).
            "cores_busy": round((sum(cpu_after.values()) - sum(cpu_before.values())) / elapsed, 2),
            # Each part's share: the stub and this process (the Bot API server) are the test's, not the companion's.
            "cores_by_part": {part: round((cpu_after[part] - cpu_before[part]) / elapsed, 2) for part in cpu_after},
            "drafts": sum(len([d for d in api.drafts if d.chat_id == FIRST_USER + u]) for u in range(users)),
            "lost": lost, "duplicated": duplicated}


async def main(users: int, messages: int, first_token_s: float, tokens_per_s: float, tokens: int) -> dict[str, Any]:
    configure_logging("WARNING", "console")
    streamed = await _run(True, users, messages, first_token_s, tokens_per_s, tokens)
    plain = await _run(False, users, messages, first_token_s, tokens_per_s, tokens)
    writing_s = first_token_s + (tokens - 1) / tokens_per_s
    print(f"{users} users x {messages} messages; the model: first token after {first_token_s * 1000:.0f} ms, "
          f"{tokens_per_s:g} tokens/s, {tokens} tokens a reply ({writing_s:.1f} s of writing)")
    for name, run in (("streamed", streamed), ("not streamed", plain)):
        print(f"{name:>12}: first visible text after the first token p50 {run['first_visible_p50_ms']:.0f} ms, p95 "
              f"{run['first_visible_p95_ms']:.0f} ms; message after the last token p50 {run['final_p50_ms']:.0f} ms, "
              f"p95 {run['final_p95_ms']:.0f} ms; drafts {run['drafts']}; worker CPU "
              f"{run['worker_cpu_ms_per_turn']:g} ms a turn; cores busy {run['cores_busy']:g}; lost {run['lost']}, "
              f"duplicated {run['duplicated']}")
        parts = ", ".join(f"{part} {cores:g}" for part, cores in run["cores_by_part"].items())
        print(f"{'':>14}cores busy by part: {parts}")
    return {"users": users, "messages": messages, "first_token_ms": round(first_token_s * 1000),
            "tokens_per_s": tokens_per_s, "tokens": tokens,
            "first_visible_overhead_p50_ms": streamed["first_visible_p50_ms"],
            "first_visible_overhead_p95_ms": streamed["first_visible_p95_ms"],
            "final_overhead_p50_ms": streamed["final_p50_ms"], "final_overhead_p95_ms": streamed["final_p95_ms"],
            "unstreamed_first_visible_overhead_p95_ms": plain["first_visible_p95_ms"],
            "unstreamed_final_overhead_p95_ms": plain["final_p95_ms"],
            "worker_cpu_ms_per_turn": streamed["worker_cpu_ms_per_turn"],
            "unstreamed_worker_cpu_ms_per_turn": plain["worker_cpu_ms_per_turn"],
            "cores_busy": streamed["cores_busy"], "unstreamed_cores_busy": plain["cores_busy"],
            "cores_by_part": streamed["cores_by_part"], "unstreamed_cores_by_part": plain["cores_by_part"],
            "lost": streamed["lost"] + plain["lost"], "duplicated": streamed["duplicated"] + plain["duplicated"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--first-token-s", type=float, default=0.5)
    parser.add_argument("--tokens-per-s", type=float, default=50.0)
    parser.add_argument("--tokens", type=int, default=150)
    args = parser.parse_args()
    result = asyncio.run(main(args.users, args.messages, args.first_token_s, args.tokens_per_s, args.tokens))
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
