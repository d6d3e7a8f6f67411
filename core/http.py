"""HTTP clients of the remote services the worker calls on every turn."""

from __future__ import annotations

from openai import AsyncOpenAI, DefaultAioHttpClient


def openai_client(base_url: str | None, api_key: str, *, max_retries: int, timeout: float) -> AsyncOpenAI:
    """An openai SDK client whose requests go over aiohttp (the SDK's own option) instead of HTTPX2: a call costs
    ~20-25% less CPU (against a local server, on uvloop: a chat completion 0.94 ms rather than 1.24 ms, an embedding
    1.19 ms rather than 1.50 ms)."""
    return AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=max_retries, timeout=timeout,
                       http_client=DefaultAioHttpClient(timeout=timeout))
