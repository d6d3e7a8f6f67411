"""A small OpenAI-compatible chat completions server for tests and benchmarks.

It speaks the real wire format (bearer auth, the chat.completion object, the {"error": {...}} envelope with HTTP
status codes, Retry-After on 429, and with "stream": true server-sent chat.completion.chunk events ending in
`data: [DONE]`, usage in a last chunk when stream_options asks for it), so the real `openai` client talks to it
unchanged. Replies follow a script when one is given, otherwise a default that echoes the user's last message. A
reply can take its time: ``first_token_s`` before its first token, then ``tokens_per_s`` (streamed, token by token;
otherwise the whole reply once its last token is written).

It also transcribes (`/v1/audio/transcriptions`: multipart/form-data with `file` and `model`, the formats the real
endpoint reads, a JSON `{"text", "usage"}` answer) what ``speech`` says each recording holds, and reads images in
chat messages (`image_url` parts: data URLs of JPEG, PNG, WebP or GIF, refused otherwise as the real API refuses
them), answering a request with an image with what ``sights`` says it shows.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.local_http import send_json, serve

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 429: "rate_limit_error"}


@dataclass
class Reply:
    """Answer with this text."""

    text: str
    delay_s: float = 0.0
    cut_after: int | None = None  # streamed: the connection drops after this many tokens


@dataclass
class Fail:
    """Answer with an HTTP error in OpenAI's error envelope."""

    status: int
    message: str = "scripted failure"
    retry_after_s: float | None = None


@dataclass
class FakeOpenAI:
    """The server; ``requests`` records every request body it received."""

    default: Callable[[dict[str, Any]], str] = field(default=lambda body: "I hear you: " + _last_user(body))
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each chat completion request
    _script: deque = field(default_factory=deque)
    _json_script: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count = field(default_factory=itertools.count)
    first_token_s: float = 0.0  # a streamed reply's wait before its first token
    tokens_per_s: float = 0.0  # and its pace after it (0: all at once); a token is a word and the space after it
    # Each complete reply that took its time: the user's message it answered, when its first and its last token were
    # written (time.perf_counter(), a clock every process of the machine shares); appended to this file as JSON lines.
    streams: list[tuple[str, float, float]] = field(default_factory=list)
    streams_log: str | None = None
    # What each recording says (by its bytes), and what each image shows; unknown ones are silence, "A photo.".
    speech: dict[bytes, str] = field(default_factory=dict)
    sights: dict[bytes, str] = field(default_factory=dict)
    # Every transcription request (model, file name, bytes) and every image a chat request carried (its bytes).
    transcriptions: list[tuple[str, str, bytes]] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    _audio_script: deque = field(default_factory=deque)

    def start(self) -> str:
        """Serve on a free loopback port; returns the base URL to give the openai client."""
        self._server = serve(self._handle)
        return self.url

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def script(self, *steps: Reply | Fail) -> None:
        """The next requests get these answers, in order; after them the default answers again."""
        with self._lock:
            self._script.extend(steps)

    def script_json(self, *steps: Reply | Fail | dict[str, Any]) -> None:
        """Answers for structured requests (response_format json_schema), which otherwise get the smallest
        document their schema allows; a dict is sent as its JSON text."""
        with self._lock:
            self._json_script.extend(Reply(json.dumps(step)) if isinstance(step, dict) else step for step in steps)

    def script_audio(self, *steps: Fail | None) -> None:
        """The next transcription requests fail with these errors, in order (None: that one is answered)."""
        with self._lock:
            self._audio_script.extend(steps)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._json_script.clear()
            self._audio_script.clear()
            self.transcriptions.clear()
            self.images.clear()
            self.requests.clear()
            self.arrivals.clear()

    def _streamed(self, message: str, first: float, last: float) -> None:
        with self._lock:
            self.streams.append((message, first, last))
            if self.streams_log is not None:
                with open(self.streams_log, "a") as log:
                    log.write(json.dumps({"message": message, "first_token_at": first, "last_token_at": last}) + "\n")

    def _next(self, structured: bool) -> Reply | Fail | None:
        with self._lock:
            script = self._json_script if structured else self._script
            return script.popleft() if script else None

    def _embeddings(self, request: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if not body.get("model") or body.get("input") in (None, "", []):
            return _send_error(request, 400, "'model' and 'input' are required properties.")
        dimension = body.get("dimensions") or EMBEDDING_DIMENSIONS.get(body["model"])
        if dimension is None:
            return _send_error(request, 404, f"The model `{body['model']}` does not exist or you do not have access "
                                             "to it.")
        self.requests.append(body)
        step = self._next(False) if self._script and isinstance(self._script[0], Fail) else None
        if isinstance(step, Fail):
            return _send_error(request, step.status, step.message)
        send_json(request, 200, _embedding_response(body, int(dimension)))

    def _transcribe(self, request: BaseHTTPRequestHandler, raw: bytes) -> None:
        kind = request.headers.get("Content-Type", "")
        if not kind.startswith("multipart/form-data"):
            return _send_error(request, 400, "Invalid Content-Type header (expected multipart/form-data).")
        form: dict[str, Any] = {}
        for part in BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + raw).iter_parts():
            content = part.get_payload(decode=True)
            form[part.get_param("name", header="content-disposition")] = (part.get_filename(), content)
        if "file" not in form or not form["file"][1]:
            return _send_error(request, 400, "Missing required parameter: 'file'.")
        if "model" not in form:
            return _send_error(request, 400, "Missing required parameter: 'model'.")
        filename, audio = form["file"]
        model = form["model"][1].decode()
        if (filename or "").rpartition(".")[2].lower() not in AUDIO_FORMATS:
            return _send_error(request, 400, f"Invalid file format. Supported formats: {list(AUDIO_FORMATS)}")
        with self._lock:
            self.transcriptions.append((model, filename, audio))
            step = self._audio_script.popleft() if self._audio_script else None
        if isinstance(step, Fail):
            return _send_error(request, step.status, step.message)
        text = self.speech.get(audio, "")
        audio_tokens, text_tokens = max(1, len(audio) // 100), len(text.split())
        send_json(request, 200, {"text": text, "usage": {
            "type": "tokens", "input_tokens": audio_tokens, "output_tokens": text_tokens,
            "total_tokens": audio_tokens + text_tokens,
            "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}})

    def _seen(self, body: dict[str, Any]) -> tuple[str | None, str | None]:
        """What the images of a chat request show (None: it has none), or why they are refused."""
        images = []
        for message in body["messages"]:
            for part in message.get("content") if isinstance(message.get("content"), list) else []:
                if part.get("type") != "image_url":
                    continue
                match = re.fullmatch(r"data:image/(jpeg|png|webp|gif);base64,([A-Za-z0-9+/=]+)",
                                     (part.get("image_url") or {}).get("url", ""))
                try:
                    images.append(base64.b64decode(match.group(2), validate=True) if match else b"")
                except ValueError:
                    images.append(b"")
        if not images:
            return None, None
        if not all(images):
            return None, ("You uploaded an unsupported image. Please make sure your image is below 20 MB in size "
                          "and is of one the following formats: ['png', 'jpeg', 'gif', 'webp'].")
        with self._lock:
            self.images.extend(images)
        return " ".join(self.sights.get(image, "A photo.") for image in images), None

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length", "0"))
        raw = request.rfile.read(length)
        if request.path not in ("/v1/chat/completions", "/v1/embeddings", "/v1/audio/transcriptions"):
            return _send_error(request, 404, f"Invalid URL (POST {request.path})")
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return _send_error(request, 401, "You didn't provide an API key.")
        if request.path == "/v1/audio/transcriptions":
            return self._transcribe(request, raw)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return _send_error(request, 400, "We could not parse the JSON body of your request.")
        if request.path == "/v1/embeddings":
            return self._embeddings(request, body)
        if not isinstance(body.get("messages"), list) or not body.get("model"):
            return _send_error(request, 400, "'model' and 'messages' are required properties.")
        seen, refusal = self._seen(body)
        if refusal is not None:
            return _send_error(request, 400, refusal)
        self.requests.append(body)
        self.arrivals.append(time.monotonic())
        schema = _json_schema(body)
        step = self._next(schema is not None)
        if isinstance(step, Fail):
            headers = {"retry-after": str(step.retry_after_s)} if step.retry_after_s is not None else {}
            return _send_error(request, step.status, step.message, headers)
        if step is not None and step.delay_s:
            time.sleep(step.delay_s)
        if step is not None:
            text = step.text
        elif seen is not None:
            text = seen
        else:
            text = json.dumps(_smallest(schema)) if schema is not None else self.default(body)
        if body.get("stream"):
            return self._stream(request, body, text, next(self._ids), step.cut_after if step is not None else None)
        if self.first_token_s or self.tokens_per_s:  # the model takes as long as it would streaming
            time.sleep(self.first_token_s)
            first = time.perf_counter()
            tokens = len(re.findall(r"\S+\s*", text))
            time.sleep((tokens - 1) / self.tokens_per_s if self.tokens_per_s and tokens else 0.0)
            self._streamed(_last_user(body), first, time.perf_counter())
        send_json(request, 200, _completion(body, text, next(self._ids)))

    def _stream(self, request: BaseHTTPRequestHandler, body: dict[str, Any], text: str, number: int,
                cut_after: int | None = None) -> None:
        """The reply as OpenAI streams it: chunked server-sent events, a chunk per token, then [DONE]."""
        request.send_response(200)
        request.send_header("Content-Type", "text/event-stream; charset=utf-8")
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()

        def event(payload: dict[str, Any] | str) -> None:
            data = f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
            request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            request.wfile.flush()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"id": f"chatcmpl-fake{number}", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body["model"], "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        event(chunk({"role": "assistant", "content": ""}))
        time.sleep(self.first_token_s)
        first = time.perf_counter()
        for n, token in enumerate(re.findall(r"\S+\s*", text) or [text]):
            if n == cut_after:  # the connection drops mid-reply
                request.close_connection = True
                request.connection.shutdown(socket.SHUT_RDWR)
                return
            if n and self.tokens_per_s:  # token n is due n / tokens_per_s after the first, however long writes take
                time.sleep(max(0.0, first + n / self.tokens_per_s - time.perf_counter()))
            event(chunk({"content": token}))
        self._streamed(_last_user(body), first, time.perf_counter())
        event(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = _completion(body, text, number)["usage"]
            event({**chunk({}), "choices": [], "usage": usage})
        event("[DONE]")
        request.wfile.write(b"0\r\n\r\n")
        request.wfile.flush()


AUDIO_FORMATS = ("flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm")
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}


def _embedding(text: str, dimension: int) -> list[float]:
    """A deterministic unit vector: each word hashed into a bucket, so texts sharing words come out close."""
    vector = [0.0] * dimension
    for word in text.lower().split():
        vector[int(hashlib.sha256(word.encode()).hexdigest(), 16) % dimension] += 1.0
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of a structured-output request, as OpenAI's API takes it."""
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema") or {}
    return None


def _smallest(schema: dict[str, Any]) -> Any:
    """The smallest value a JSON schema accepts: empty arrays and strings, minimum numbers, required keys only."""
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: _smallest(properties.get(name) or {}) for name in schema.get("required") or []}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return False
    if "enum" in schema:
        return schema["enum"][0]
    return ""


def _embedding_response(body: dict[str, Any], dimension: int) -> dict[str, Any]:
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    tokens = sum(len(str(t).split()) for t in texts)
    as_base64 = body.get("encoding_format") == "base64"  # the SDK asks for base64 unless told otherwise

    def encode(vector: list[float]) -> list[float] | str:
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector

    return {"object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": n, "embedding": encode(_embedding(str(t), dimension))}
                     for n, t in enumerate(texts)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _last_user(body: dict[str, Any]) -> str:
    content = next((m["content"] for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
    if isinstance(content, list):  # text and image parts: the text
        return " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    return content


def _completion(body: dict[str, Any], text: str, number: int) -> dict[str, Any]:
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
    completion_tokens = len(text.split())
    return {
        "id": f"chatcmpl-fake{number}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
        "system_fingerprint": None,
    }


def _send_error(request: BaseHTTPRequestHandler, status: int, message: str,
                headers: dict[str, str] | None = None) -> None:
    error_type = _ERROR_TYPES.get(status, "server_error")
    send_json(request, status, {"error": {"message": message, "type": error_type, "param": None,
                                           "code": None}}, headers)


def serve_in_subprocess(*args: str) -> tuple[str, subprocess.Popen[str]]:
    """Run the default-answering server in a process of its own (for benchmarks: no GIL shared with the worker);
    ``args`` as this module's command line takes them."""
    process = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", *args], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    return process.stdout.readline().strip(), process


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="the OpenAI-compatible stub, serving until killed")
    parser.add_argument("--first-token-s", type=float, default=0.0)
    parser.add_argument("--tokens-per-s", type=float, default=0.0)
    parser.add_argument("--streams-log", help="append each complete stream's timing here, a JSON line each")
    args = parser.parse_args()
    server = FakeOpenAI(first_token_s=args.first_token_s, tokens_per_s=args.tokens_per_s,
                        streams_log=args.streams_log)
    print(server.start(), flush=True)
    threading.Event().wait()
