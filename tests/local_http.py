"""The HTTP plumbing of the local stand-ins for remote APIs (OpenAI, the Bot API): a threaded loopback server."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    """A client hanging up (a worker stopping, say) is not an error worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(handle: Callable[[BaseHTTPRequestHandler], None], *, get: bool = False) -> ThreadingHTTPServer:
    """Serve POST (and GET when asked) with ``handle`` on a free loopback port, in a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs
        # One write per response and no Nagle delay: headers and body in separate segments would meet the
        # client's delayed ACK and stall every keep-alive response by ~40 ms.
        disable_nagle_algorithm = True
        wbufsize = 64 * 1024

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            handle(self)

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if get:
                handle(self)
            else:
                self.send_error(405)

        def log_message(self, *_args: Any) -> None:
            pass

    server = _QuietServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send_json(request: BaseHTTPRequestHandler, status: int, payload: Any,
              headers: dict[str, str] | None = None) -> None:
    """Answer with a JSON body, in one write (see ``serve``)."""
    data = json.dumps(payload).encode()
    request.send_response(status)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(data)
