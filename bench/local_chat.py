"""The embedded model as a user meets it: 20 turns of a scripted conversation through `companion dev` on 2 cores.

    uv run python -m bench.local_chat [--turns 20] [--cores 2]

`companion dev --no-chat` runs in a fresh folder (embedded Temporal, PostgreSQL and model, no key), pinned to the
first --cores CPUs, and this process talks to it as `companion say` does, one message after the other. It prints each
turn's latency (message sent to reply back) with the prompt and reply tokens the model saw and wrote (from the
worker's log), then the CPU probe, and last one JSON object: turn20_s (the last turn), p50_s, max_s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.probe import cpu_probe_s
from core.settings import load_settings
from schemas.memory import Channel
from schemas.turn import ChatUser, IncomingMessage
from tests.local_http import free_port
from workflows.client import connect, send_message

START_TIMEOUT_S = 180
USER = 4242
SCRIPT = [
    "Hi! I'm Maya. I just moved to Lyon for a new job.",
    "I work as a nurse at the children's hospital.",
    "My first week was exhausting but the team is kind.",
    "I have a cat called Pixel. She hates the new flat.",
    "Do you have any tips for settling a cat into a new home?",
    "I'm thinking of joining a climbing gym to meet people.",
    "My sister Ana lives in Lisbon, I miss her.",
    "She is visiting in two weeks, I want to plan something nice.",
    "What could we do in Lyon on a rainy weekend?",
    "I also started learning French properly, it's hard.",
    "Today a patient's mum thanked me and I almost cried.",
    "Night shifts are next week, I'm nervous about sleep.",
    "How do people cope with night shifts?",
    "Pixel finally slept on the sofa today!",
    "I booked a climbing intro class for Saturday.",
    "Ana wants to try the traditional bouchons.",
    "Do you remember my cat's name?",
    "I'm a bit homesick tonight.",
    "Thanks for listening, it helps.",
    "What should I focus on this week?",
]


def _pin(cores: int) -> None:
    """In the child, before exec: run on the first ``cores`` CPUs this process may use."""
    allowed = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, allowed[:cores])


def _message(n: int, text: str) -> IncomingMessage:
    return IncomingMessage(message_key=f"bench-local:{USER}:{n}", user=ChatUser(telegram_id=USER, first_name="Maya"),
                           chat_id=USER, channel=Channel.CONSOLE, text=text, sent_at=datetime.now(UTC))


def _llm_replies(log: Path) -> list[dict]:
    """The worker's llm.reply log lines, in order (tokens and duration of each reply)."""
    lines = []
    for line in log.read_text(errors="replace").splitlines():
        if '"llm.reply"' in line:
            record = json.loads(line)
            if record.get("purpose", "reply") == "reply":
                lines.append(record)
    return lines


async def _converse(address: str, turns: int) -> list[float]:
    # Messages back to back: the per-user rate limit is off, so that --turns above 20 are all the model's.
    settings = load_settings(temporal_address=address, user_messages_per_minute=0)
    client = await connect(settings)
    latencies = []
    for n in range(turns):
        started = time.perf_counter()
        await send_message(client, settings, _message(n, SCRIPT[n % len(SCRIPT)]))
        latencies.append(time.perf_counter() - started)
    return latencies


def main(turns: int, cores: int) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="companion-bench-local-"))
    address = f"localhost:{free_port(leaving=1000)}"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OPENAI_", "DATABASE_URL", "TELEGRAM_", "PINECONE_"))}
    env.update({"HOME": str(folder), "TEMPORAL_ADDRESS": address, "LOG_FORMAT": "json", "NUDGE_QUIET_HOURS": "off"})
    output = folder / "dev.out"
    with output.open("w") as out:
        dev = subprocess.Popen([sys.executable, "-m", "cli", "dev", "--no-chat"], cwd=folder, env=env, stdout=out,
                               stderr=subprocess.STDOUT, preexec_fn=lambda: _pin(cores))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Press Ctrl-C" not in output.read_text():
            if dev.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"companion dev did not start:\n{output.read_text()[-3000:]}")
            time.sleep(0.2)
        latencies = asyncio.run(_converse(address, turns))
        replies = _llm_replies(folder / ".companion" / "companion.log")
    finally:
        dev.send_signal(signal.SIGTERM)
        dev.wait(60)
        shutil.rmtree(folder, ignore_errors=True)
    for n, seconds in enumerate(latencies):
        tokens = (f"prompt {replies[n].get('prompt_tokens')} tokens, reply {replies[n].get('completion_tokens')}"
                  if n < len(replies) else "")
        print(f"turn {n + 1:2d}  {seconds:5.2f} s  {tokens}")
    return {"turns": turns, "cores": cores, "turn20_s": round(latencies[-1], 2),
            "p50_s": round(statistics.median(latencies), 2), "max_s": round(max(latencies), 2)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--cores", type=int, default=2)
    arguments = parser.parse_args()
    result = main(arguments.turns, arguments.cores)
    probe = cpu_probe_s()
    print(f"cpu probe {probe:.3f} s (bench.probe: the same fixed work on every day)")
    print(json.dumps({**result, "cpu_probe_s": round(probe, 3)}))
