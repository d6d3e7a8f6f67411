"""The HTTP plumbing of the local stand-ins for remote APIs (OpenAI, the Bot API): a threaded loopback server."""

from __future__ import annotations

import json
import random
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


LOWEST_PORT = 10_000
_ports = random.SystemRandom()  # hypothesis seeds `random` the same way for every example


def free_port(leaving: int = 0) -> int:
    """A loopback port nothing listens on right now, with ``port + leaving`` free too when ``leaving`` is given.

    It comes from below the kernel's ephemeral range, not from binding port 0: a port the kernel hands out (an
    outgoing connection's, a server's on port 0) could be taken again between this probe and the bind of the process
    the test starts. That happened in CI: a metrics exporter found its port in use.
    """
    top = _ephemeral_low() - 1 - leaving
    for _ in range(100):
        port = _ports.randint(LOWEST_PORT, top)
        if all(_bindable(candidate) for candidate in {port, port + leaving}):
            return port
    raise RuntimeError(f"no free port between {LOWEST_PORT} and {top}")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


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
