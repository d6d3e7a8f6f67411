"""`companion codec-server`: decodes (and encodes) the companion's encrypted payloads for the Temporal UI and CLI.

The codec server protocol: POST /decode and /encode take `{"payloads": [...]}`, Payloads as protobuf JSON (metadata
and data in base64), and answer the same shape. The UI calls it from the browser, so the UI's origin gets CORS
headers; with CODEC_SERVER_TOKEN set, every call must bring `Authorization: Bearer <token>` (the UI's "pass access
token" or `temporal --codec-auth`), else 401. Operators point the UI at it (`companion dev` does for its own UI) or
the CLI: `temporal workflow show -w ID --codec-endpoint http://127.0.0.1:8081`.
"""

from __future__ import annotations

import asyncio
import hmac
import signal

from aiohttp import hdrs, web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from core.codec import EncryptionCodec, PayloadKeyError
from core.errors import ConfigurationError
from core.logging import get_logger
from core.settings import Settings

DEFAULT_PORT = 8081
# The origins of the Temporal UI `companion dev` serves (TEMPORAL_ADDRESS port + 1000).
LOCAL_UI_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization"
MAX_BODY = 8 * 1024 * 1024

_log = get_logger(__name__)


def codec_app(codec: EncryptionCodec, token: str | None, origins: tuple[str, ...]) -> web.Application:
    """The codec server's routes, over ``codec``; ``token`` (if any) is required of every call."""

    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin in origins:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "POST, OPTIONS"
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOWED_HEADERS
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            response.headers[hdrs.VARY] = "Origin"
        return response

    async def preflight(request: web.Request) -> web.StreamResponse:
        return cors(request, web.Response())

    def handler(encode: bool):
        async def handle(request: web.Request) -> web.StreamResponse:
            if token is not None and not hmac.compare_digest(request.headers.get(hdrs.AUTHORIZATION, ""),
                                                             f"Bearer {token}"):
                _log.warning("codec_server.refused", path=request.path, reason="wrong or missing bearer token")
                return cors(request, web.json_response({"message": "a valid bearer token is required"}, status=401))
            try:
                payloads = json_format.Parse(await request.text(), Payloads())
            except json_format.ParseError as exc:
                return cors(request, web.json_response({"message": f"not Payloads JSON: {exc}"}, status=400))
            try:
                done = await (codec.encode if encode else codec.decode)(payloads.payloads)
            except PayloadKeyError as exc:
                return cors(request, web.json_response({"message": exc.message}, status=422))
            _log.info("codec_server.served", path=request.path, payloads=len(done),
                      namespace=request.headers.get("X-Namespace"))
            body = json_format.MessageToJson(Payloads(payloads=done))
            return cors(request, web.Response(text=body, content_type="application/json"))

        return handle

    app = web.Application(client_max_size=MAX_BODY)
    for path, encode in (("/decode", False), ("/encode", True)):
        app.router.add_post(path, handler(encode))
        app.router.add_route("OPTIONS", path, preflight)
    return app


async def start_codec_server(settings: Settings, host: str, port: int,
                             origins: tuple[str, ...] = LOCAL_UI_ORIGINS) -> web.AppRunner:
    """Serve the codec server until the runner is cleaned up."""
    codec = settings.payload_codec
    if codec is None:
        raise ConfigurationError("the codec server needs PAYLOAD_KEYS (the keys the payloads are encrypted with)")
    token = settings.codec_server_token.get_secret_value() if settings.codec_server_token else None
    runner = web.AppRunner(codec_app(codec, token, origins), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    _log.info("codec_server.started", host=host, port=port, token=token is not None, origins=list(origins))
    return runner


async def run_codec_server(settings: Settings, host: str, port: int, origins: list[str]) -> int:
    """`companion codec-server`: serve until SIGTERM or Ctrl-C."""
    runner = await start_codec_server(settings, host, port, tuple(origins) or LOCAL_UI_ORIGINS)
    print(f"codec server on http://{host}:{port} (POST /decode, /encode)"
          + ("; bearer token required" if settings.codec_server_token else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
