"""A small Telegram Bot API server for tests: the real python-telegram-bot talks to it unchanged.

Faithful where the companion relies on it: `/bot<token>/<method>` URLs; parameters as form fields
(url-encoded or multipart) or JSON, so every value arrives as a string and structured ones as JSON text; the
`{"ok": true, "result": ...}` envelope and `{"ok": false, "error_code", "description", "parameters"}` errors;
`getUpdates` long polling with offsets, refused (409) while a webhook is set; HTML parse mode checked as Telegram
checks it; the 4,096-character limit after entity parsing; drafts (`sendMessageDraft`) in private chats only; edits
refused when they change nothing ("message is not modified") and deletions of messages that are gone; documents
uploaded with `sendDocument` (50 MB, captions of 1,024 characters); 403 from a chat that blocked the bot; 429 with
`parameters.retry_after`; files users sent (`getFile`, 20 MB at most, then the download from `/file/bot<token>/<path>`).
Tests push updates, script failures and read what the bot sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import itertools
import json
import math
import re
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote

from tests.local_http import send_json, serve

TOKEN = "123456:TEST-token-for-the-local-bot-api_0"
BOT_ID = 123456
BOT_USERNAME = "companion_test_bot"
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_UPLOAD = 50 * 1024 * 1024  # bots send files of up to 50 MB
MAX_DOWNLOAD = 20 * 1024 * 1024  # and get (getFile) files of up to 20 MB
_ALLOWED_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "a", "code", "pre", "tg-spoiler",
                 "span", "blockquote", "tg-emoji"}
_TAG = re.compile(r"<(/?)([a-zA-Z][\w-]*)([^>]*)>")


@dataclass
class Fail:
    """Answer the next call of a method with this Bot API error."""

    error_code: int
    description: str
    retry_after: int | None = None
    html: bool = False  # answered as the front proxy answers a 502/504: an HTML page, not the JSON envelope


@dataclass
class Sent:
    """A message the bot sent."""

    chat_id: int
    message_id: int
    text: str
    parse_mode: str | None
    reply_markup: dict[str, Any] | None
    received_at: float = field(default_factory=time.perf_counter)


class Upload(bytes):
    """A file uploaded with a request (multipart/form-data): its bytes, and its ``filename``."""

    filename: str


@dataclass
class Document:
    """A file the bot sent (sendDocument)."""

    chat_id: int
    message_id: int
    filename: str
    content: bytes
    caption: str


@dataclass
class StoredFile:
    """A file a user sent, as Telegram keeps it: ``size`` may claim more than ``content`` holds (a big file, without
    the test holding its bytes)."""

    file_id: str
    file_unique_id: str
    path: str
    content: bytes
    size: int


@dataclass
class Draft:
    """A draft the bot showed: the ephemeral preview of a message being written (sendMessageDraft)."""

    chat_id: int
    draft_id: int
    text: str
    received_at: float = field(default_factory=time.perf_counter)


@dataclass
class Edit:
    """An edit of a message the bot sent (editMessageText): the text it made the message show."""

    chat_id: int
    message_id: int
    text: str
    parse_mode: str | None
    received_at: float = field(default_factory=time.perf_counter)


@dataclass
class FakeBotAPI:
    """The server; tests use push_*, fail_next, block, and read sent / actions / calls."""

    token: str = TOKEN
    sent: list[Sent] = field(default_factory=list)
    actions: list[tuple[int, str]] = field(default_factory=list)
    drafts: list[Draft] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    deleted: list[Sent] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)
    files: dict[str, StoredFile] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)  # the file ids whose bytes the bot fetched
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    webhook: dict[str, Any] | None = None
    blocked: set[int] = field(default_factory=set)
    _updates: list[dict[str, Any]] = field(default_factory=list)
    _failures: dict[str, deque[Fail | None]] = field(default_factory=lambda: defaultdict(deque))
    _update_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _message_ids: itertools.count = field(default_factory=lambda: itertools.count(50_000))
    _cond: threading.Condition = field(default_factory=threading.Condition)
    # Flood control, as Telegram keeps it: after a 429 naming a wait, the method is refused until the wait is over.
    _flooded_until: dict[str, float] = field(default_factory=dict)
    _by_chat: dict[int, list[Sent]] = field(default_factory=lambda: defaultdict(list))
    # Coroutines waiting for a chat's next message (wait_for), woken from the server's threads.
    _waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = field(
        default_factory=lambda: defaultdict(list))

    def start(self) -> str:
        """Serve on a free loopback port; returns the base URL for python-telegram-bot (`.../bot`)."""
        self._server = serve(self._handle, get=True)
        return self.url

    @property
    def url(self) -> str:
        """The base URL python-telegram-bot takes (`base_url`): the token and method follow it."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/bot"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what tests do ------------------------------------------------------------------------------------------

    def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for getUpdates (its update_id is assigned here)."""
        with self._cond:
            update = {"update_id": next(self._update_ids), **update}
            self._updates.append(update)
            self._cond.notify_all()
        return update

    def add_file(self, content: bytes, path: str, size: int | None = None) -> dict[str, Any]:
        """Keep a file a user sends; returns its ids and size, as a message's voice, photo or document carries
        them (the test adds duration, mime_type, width and height as Telegram would)."""
        with self._cond:
            number = len(self.files) + 1
            stored = StoredFile(file_id=f"AwACAgQAAx{number:06d}-{path.replace('/', '_')}",
                                file_unique_id=f"AgAD{number:06d}", path=path, content=content,
                                size=len(content) if size is None else size)
            self.files[stored.file_id] = stored
        return {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "file_size": stored.size}

    def fail_next(self, method: str, *failures: Fail | None) -> None:
        """The next calls of ``method`` fail with these errors, in order (None: that call goes through)."""
        with self._cond:
            self._failures[method.lower()].extend(failures)

    def block(self, chat_id: int) -> None:
        """The user of this private chat blocks the bot."""
        self.blocked.add(chat_id)

    def messages(self, chat_id: int) -> list[Sent]:
        with self._cond:
            return list(self._by_chat.get(chat_id, ()))

    async def wait_for(self, chat_id: int, count: int = 1, timeout: float = 20.0) -> list[Sent]:
        """The first ``count`` messages sent to a chat, waiting for them to arrive (woken by each one, not polled:
        a benchmark's hundreds of waiting users cost nothing while they wait)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                got = list(self._by_chat.get(chat_id, ()))
                if len(got) >= count:
                    return got[:count]
                arrived = asyncio.Event()
                self._waiters[chat_id].append((asyncio.get_running_loop(), arrived))
            try:
                await asyncio.wait_for(arrived.wait(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                raise AssertionError(f"chat {chat_id} got {got!r}, expected {count} messages") from None

    def pending_updates(self) -> int:
        with self._cond:
            return len(self._updates)

    def reset(self) -> None:
        """Forget what earlier tests sent, blocked or scripted."""
        with self._cond:
            self.sent.clear()
            self._by_chat.clear()
            self._waiters.clear()
            self.actions.clear()
            self.drafts.clear()
            self.edits.clear()
            self.deleted.clear()
            self.documents.clear()
            self.files.clear()
            self.downloads.clear()
            self.calls.clear()
            self.blocked.clear()
            self._failures.clear()
            self._flooded_until.clear()
            self._updates.clear()
            self.webhook = None

    # --- the protocol -------------------------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        if request.command == "GET" and request.path.startswith("/file/bot"):
            return self._download(request)
        match = re.fullmatch(r"/bot([^/]+)/(\w+)", request.path.split("?")[0])
        if match is None:
            return _reply(request, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
        token, method = match.groups()
        if token != self.token:
            return _reply(request, 401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
        try:
            params = _parameters(request)
        except ValueError as exc:
            return _error(request, 400, f"Bad Request: {exc}")
        with self._cond:
            self.calls.append((method, params))
            failure = self._failures[method.lower()].popleft() if self._failures[method.lower()] else None
            wait = self._flooded_until.get(method.lower(), 0.0) - time.monotonic()
            if failure is None and wait > 0:  # called again before the wait Telegram named is over
                failure = Fail(429, f"Too Many Requests: retry after {math.ceil(wait)}", retry_after=math.ceil(wait))
            elif failure is not None and failure.error_code == 429 and failure.retry_after:
                self._flooded_until[method.lower()] = time.monotonic() + failure.retry_after
        if failure is not None and failure.html:
            return _html_error(request, failure.error_code, failure.description)
        if failure is not None:
            extra = {"parameters": {"retry_after": failure.retry_after}} if failure.retry_after else {}
            return _error(request, failure.error_code, failure.description, extra)
        handler = getattr(self, f"_m_{method.lower()}", None)
        if handler is None:
            return _error(request, 404, "Not Found: method not found")
        try:
            result = handler(params)
        except _APIError as exc:
            return _error(request, exc.code, exc.description)
        _reply(request, 200, {"ok": True, "result": result})

    def _m_getfile(self, params: dict[str, Any]) -> dict[str, Any]:
        stored = self.files.get(params.get("file_id", ""))
        if stored is None:
            raise _APIError(400, "Bad Request: invalid file_id")
        if stored.size > MAX_DOWNLOAD:
            raise _APIError(400, "Bad Request: file is too big")
        return {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "file_size": stored.size,
                "file_path": stored.path}

    def _download(self, request: BaseHTTPRequestHandler) -> None:
        """GET /file/bot<token>/<file_path>: the bytes of a file getFile named."""
        token, _, path = unquote(request.path).removeprefix("/file/bot").partition("/")
        stored = next((f for f in self.files.values() if f.path == path and f.size <= MAX_DOWNLOAD), None)
        if token != self.token or stored is None:
            return _reply(request, 404, {"ok": False, "error_code": 404, "description": "Not Found"})
        with self._cond:
            self.downloads.append(stored.file_id)
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(stored.content)))
        request.end_headers()
        request.wfile.write(stored.content)

    def _m_getme(self, _params: dict[str, Any]) -> dict[str, Any]:
        return {"id": BOT_ID, "is_bot": True, "first_name": "Companion", "username": BOT_USERNAME,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    def _m_getupdates(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        if self.webhook is not None:
            raise _APIError(409, "Conflict: can't use getUpdates method while webhook is active; use "
                                 "deleteWebhook to delete the webhook first")
        offset, limit = int(params.get("offset", 0)), int(params.get("limit", 100))
        deadline = time.monotonic() + min(float(params.get("timeout", 0)), 50)
        with self._cond:
            if offset:  # Telegram forgets every update below the offset: they are confirmed
                self._updates = [update for update in self._updates if update["update_id"] >= offset]
            while not self._updates and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(min(remaining, 0.5))
            return self._updates[:limit]

    def _m_setwebhook(self, params: dict[str, Any]) -> bool:
        url = params.get("url", "")
        if url and not url.startswith("https://"):
            raise _APIError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for webhook")
        secret = params.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise _APIError(400, "Bad Request: bad webhook: secret token contains unallowed characters")
        self.webhook = {"url": url, "secret_token": secret} if url else None
        return True

    def _m_deletewebhook(self, params: dict[str, Any]) -> bool:
        self.webhook = None
        if _flag(params.get("drop_pending_updates")):
            with self._cond:
                self._updates.clear()
        return True

    def _m_setmycommands(self, params: dict[str, Any]) -> bool:
        commands = _json(params, "commands")
        if not isinstance(commands, list):
            raise _APIError(400, "Bad Request: can't parse commands JSON object")
        return True

    def _m_sendchataction(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat(params)
        if params.get("action") not in {"typing", "upload_photo", "record_video", "upload_video", "record_voice",
                                        "upload_voice", "upload_document", "choose_sticker", "find_location",
                                        "record_video_note", "upload_video_note"}:
            raise _APIError(400, "Bad Request: wrong parameter action in request")
        with self._cond:
            self.actions.append((chat_id, params["action"]))
        return True

    def _m_sendmessagedraft(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat(params)
        if chat_id < 0:  # drafts are for private chats only
            raise _APIError(400, "Bad Request: TEXTDRAFT_PEER_INVALID")
        try:
            draft_id = int(params.get("draft_id", 0))
        except ValueError:
            draft_id = 0
        if not draft_id:
            raise _APIError(400, "Bad Request: draft_id must be non-zero")
        text = params.get("text", "")  # empty: a "Thinking…" placeholder
        plain = parse_html(text) if (params.get("parse_mode") or "").lower() == "html" else text
        if len(plain.encode("utf-16-le")) // 2 > MAX_TEXT:
            raise _APIError(400, "Bad Request: text is too long")
        with self._cond:
            self.drafts.append(Draft(chat_id, draft_id, plain))
        return True

    def _m_sendmessage(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._chat(params)
        text, parse_mode = params.get("text", ""), params.get("parse_mode")
        plain = self._text(text, parse_mode, too_long="message is too long")
        sent = Sent(chat_id, next(self._message_ids), text, parse_mode, _json(params, "reply_markup"))
        with self._cond:
            self.sent.append(sent)
            self._by_chat[chat_id].append(sent)
            waiting = self._waiters.pop(chat_id, [])
        for loop, arrived in waiting:
            with contextlib.suppress(RuntimeError):  # its loop closed: the test that waited is over
                loop.call_soon_threadsafe(arrived.set)
        return self._message(sent.chat_id, sent.message_id, plain)

    def _m_senddocument(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._chat(params)
        document, caption = params.get("document"), params.get("caption", "")
        if not isinstance(document, Upload):  # a file_id or URL: this server keeps no files to send again
            raise _APIError(400, "Bad Request: wrong remote file identifier specified")
        if len(document) > MAX_UPLOAD:
            raise _APIError(413, "Request Entity Too Large")
        if len(self._text(caption, params.get("parse_mode"), too_long="message caption is too long")) > MAX_CAPTION:
            raise _APIError(400, "Bad Request: message caption is too long")
        sent = Document(chat_id, next(self._message_ids), document.filename, bytes(document), caption)
        with self._cond:
            self.documents.append(sent)
        message = self._message(chat_id, sent.message_id, "")
        del message["text"]
        return {**message, "caption": caption, "document": {
            "file_id": f"doc{sent.message_id}", "file_unique_id": f"u{sent.message_id}", "file_name": sent.filename,
            "mime_type": "application/json" if sent.filename.endswith(".json") else "text/markdown",
            "file_size": len(sent.content)}}

    def _m_editmessagetext(self, params: dict[str, Any]) -> dict[str, Any]:
        chat_id = self._chat(params)
        text, parse_mode = params.get("text", ""), params.get("parse_mode")
        plain = self._text(text, parse_mode, too_long="MESSAGE_TOO_LONG")
        with self._cond:
            target = self._sent_message(chat_id, params.get("message_id"), "message to edit not found")
            markup = _json(params, "reply_markup")
            same = _rendered(target.text, target.parse_mode) == _rendered(text, parse_mode)
            if same and markup == target.reply_markup:
                raise _APIError(400, "Bad Request: message is not modified: specified new message content and reply "
                                     "markup are exactly the same as a current content and reply markup of the message")
            target.text, target.parse_mode, target.reply_markup = text, parse_mode, markup
            self.edits.append(Edit(chat_id, target.message_id, text, parse_mode))
        return self._message(chat_id, target.message_id, plain)

    def _m_deletemessage(self, params: dict[str, Any]) -> bool:
        chat_id = self._chat(params)
        with self._cond:
            target = self._sent_message(chat_id, params.get("message_id"), "message to delete not found")
            self.sent.remove(target)
            self._by_chat[chat_id].remove(target)
            self.deleted.append(target)
        return True

    def _sent_message(self, chat_id: int, message_id: str | None, missing: str) -> Sent:
        """The bot's message ``message_id`` in the chat (the caller holds the lock)."""
        if not message_id:
            raise _APIError(400, "Bad Request: message identifier is not specified")
        found = next((sent for sent in self._by_chat.get(chat_id, ()) if sent.message_id == int(message_id)), None)
        if found is None:
            raise _APIError(400, f"Bad Request: {missing}")
        return found

    @staticmethod
    def _text(text: str, parse_mode: str | None, too_long: str) -> str:
        """A message's text as the chat shows it, refused as Telegram refuses it."""
        if parse_mode and parse_mode.lower() not in ("html", "markdownv2", "markdown"):
            raise _APIError(400, "Bad Request: unsupported parse_mode")
        plain = parse_html(text) if parse_mode and parse_mode.lower() == "html" else text
        if not plain.strip():
            raise _APIError(400, "Bad Request: message text is empty")
        if len(plain.encode("utf-16-le")) // 2 > MAX_TEXT:
            raise _APIError(400, f"Bad Request: {too_long}")
        return plain

    def _m_answercallbackquery(self, params: dict[str, Any]) -> bool:
        if not params.get("callback_query_id"):
            raise _APIError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        return True

    def _chat(self, params: dict[str, Any]) -> int:
        if "chat_id" not in params:
            raise _APIError(400, "Bad Request: chat_id is empty")
        chat_id = int(params["chat_id"])
        if chat_id in self.blocked:
            raise _APIError(403, "Forbidden: bot was blocked by the user")
        return chat_id

    @staticmethod
    def _message(chat_id: int, message_id: int, text: str) -> dict[str, Any]:
        return {"message_id": message_id, "date": int(time.time()), "text": text,
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "group"},
                "from": {"id": BOT_ID, "is_bot": True, "first_name": "Companion", "username": BOT_USERNAME}}


# --- updates, as Telegram sends them -----------------------------------------------------------------------------

_message_numbers = itertools.count(1)


def user(user_id: int, first_name: str = "Ada") -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en"}


def message_update(user_id: int, text: str | None = None, *, chat_id: int | None = None, chat_type: str = "private",
                   message_id: int | None = None, entities: list[dict[str, Any]] | None = None,
                   reply_to: dict[str, Any] | None = None, edited: bool = False,
                   **content: Any) -> dict[str, Any]:
    """An update carrying a message (or an edit) from a user; ``content`` adds e.g. photo=[...] or sticker={...}."""
    chat_id = user_id if chat_id is None else chat_id
    chat = ({"id": chat_id, "type": "private", "first_name": "Ada"} if chat_type == "private"
            else {"id": chat_id, "type": chat_type, "title": "Friends"})
    message: dict[str, Any] = {"message_id": message_id or next(_message_numbers), "date": int(time.time()),
                               "chat": chat, "from": user(user_id), **content}
    if text is not None:
        message["text"] = text
        if text.startswith("/"):
            command = text.split()[0]
            entities = [{"type": "bot_command", "offset": 0, "length": len(command)}, *(entities or [])]
    if entities:
        message["entities"] = entities
    if reply_to is not None:
        message["reply_to_message"] = reply_to
    if edited:
        message["edit_date"] = int(time.time())
    return {"edited_message" if edited else "message": message}


def callback_update(user_id: int, data: str, message: dict[str, Any]) -> dict[str, Any]:
    """A press on an inline keyboard button under a message the bot sent."""
    return {"callback_query": {"id": str(next(_message_numbers)), "from": user(user_id), "chat_instance": "1",
                               "data": data, "message": message}}


def bot_message(chat_id: int, message_id: int, text: str) -> dict[str, Any]:
    """A message of the bot as it appears inside updates (reply_to_message, callback_query.message)."""
    return FakeBotAPI._message(chat_id, message_id, text)


# --- wire format -------------------------------------------------------------------------------------------------


class _APIError(Exception):
    def __init__(self, code: int, description: str):
        super().__init__(description)
        self.code, self.description = code, description


def _parameters(request: BaseHTTPRequestHandler) -> dict[str, Any]:
    """The request's parameters as Telegram reads them: query string, then the body in any accepted encoding."""
    params = {key: values[-1] for key, values in parse_qs(request.path.partition("?")[2]).items()}
    body = request.rfile.read(int(request.headers.get("Content-Length", "0")))
    kind = request.headers.get("Content-Type", "")
    if not body:
        return params
    if kind.startswith("application/json"):
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            raise ValueError("can't parse JSON body") from None
        params.update({key: value if isinstance(value, str) else json.dumps(value) for key, value in data.items()})
    elif kind.startswith("application/x-www-form-urlencoded"):
        params.update({key: values[-1] for key, values in parse_qs(body.decode(), keep_blank_values=True).items()})
    elif kind.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + body)
        for part in message.iter_parts():
            content, filename = part.get_content(), part.get_filename()
            if filename is not None:  # an uploaded file: its bytes, and the name it was sent under
                content = Upload(content if isinstance(content, bytes) else content.encode())
                content.filename = filename
            params[part.get_param("name", header="content-disposition")] = content
    return params


def _json(params: dict[str, Any], name: str) -> Any:
    if name not in params:
        return None
    try:
        return json.loads(params[name])
    except json.JSONDecodeError:
        raise _APIError(400, f"Bad Request: can't parse {name} JSON object") from None


def _rendered(text: str, parse_mode: str | None) -> tuple[str, list[tuple[str, int]]]:
    """What a chat shows of a message: its plain text and where its formatting tags sit in it (two texts that
    render alike are the same content to Telegram, however they were written)."""
    if not parse_mode or parse_mode.lower() != "html":
        return text, []
    tags, plain_length, position = [], 0, 0
    for match in _TAG.finditer(text):
        plain_length += len(html.unescape(text[position:match.start()]))
        tags.append((match.group(0).split()[0].lower().rstrip(">"), plain_length))
        position = match.end()
    return parse_html(text), tags


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


def parse_html(text: str) -> str:
    """The plain text of an HTML-formatted message, refusing what Telegram refuses."""
    plain, stack, position = [], [], 0
    for match in _TAG.finditer(text):
        plain.append(_unescape(text[position:match.start()], match.start()))
        closing, name = match.group(1), match.group(2).lower()
        offset = len(text[:match.start()].encode())
        if name not in _ALLOWED_TAGS:
            raise _APIError(400, f'Bad Request: can\'t parse entities: Unsupported start tag "{name}" at byte '
                                 f"offset {offset}")
        if closing:
            if not stack or stack[-1] != name:
                raise _APIError(400, f'Bad Request: can\'t parse entities: Unexpected end tag at byte offset {offset}')
            stack.pop()
        else:
            stack.append(name)
        position = match.end()
    plain.append(_unescape(text[position:], position))
    if stack:
        raise _APIError(400, f'Bad Request: can\'t parse entities: Can\'t find end tag corresponding to start tag '
                             f'"{stack[-1]}"')
    return "".join(plain)


def _unescape(chunk: str, start: int) -> str:
    if "<" in chunk or ">" in chunk:
        raise _APIError(400, "Bad Request: can't parse entities: Unsupported start tag at byte offset "
                             f"{start + chunk.find('<')}")
    for entity in re.findall(r"&[^;\s]*;?", chunk):
        if not re.fullmatch(r"&(lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);", entity):
            raise _APIError(400, f"Bad Request: can't parse entities: Unsupported entity {entity!r}")
    return html.unescape(chunk)


def _error(request: BaseHTTPRequestHandler, code: int, description: str,
           extra: dict[str, Any] | None = None) -> None:
    _reply(request, code, {"ok": False, "error_code": code, "description": description, **(extra or {})})


def _html_error(request: BaseHTTPRequestHandler, code: int, description: str) -> None:
    data = (f"<html>\r\n<head><title>{code} {description}</title></head>\r\n<body>\r\n<center><h1>{code} "
            f"{description}</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n").encode()
    request.send_response(code)
    request.send_header("Content-Type", "text/html")
    request.send_header("Content-Length", str(len(data)))
    request.end_headers()
    request.wfile.write(data)


def _reply(request: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
    send_json(request, status, payload)
