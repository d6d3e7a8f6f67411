"""The embedded PostgreSQL 16 (+ pgvector) from PyPI `pgserver`, used when no DATABASE_URL is set."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.logging import get_logger
from core.settings import Settings

_log = get_logger(__name__)


class EmbeddedPostgres:
    """A PostgreSQL server whose files live in one folder; stopped when the last process using it lets go."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._server = None

    def start(self) -> str:
        """Start (or join) the server and return its asyncpg URL over the Unix socket."""
        with warnings.catch_warnings():
            # platformdirs warns that XDG_RUNTIME_DIR is unset; pgserver's fallback to /tmp is fine.
            warnings.simplefilter("ignore", UserWarning)
            import pgserver

            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
        uri = self._server.get_uri()
        _log.info("postgres.embedded_started", data_dir=str(self.data_dir), pid=self._server.get_pid())
        return uri.replace("postgresql://", "postgresql+asyncpg://", 1)

    @property
    def pid(self) -> int:
        """The postmaster's process id (the server must have been started)."""
        assert self._server is not None, "the server is not started"
        return self._server.get_pid()

    def revive(self) -> int | None:
        """Start the server again if its postmaster died, in the same folder and on the same socket, so that the
        URL given out stays good; returns the new postmaster's pid, or None when it was running."""
        assert self._server is not None, "the server is not started"
        before = self._server.get_pid()
        # pgserver's precondition for ensure_postgres_running: hold its lock on the folder. It starts the server
        # only when the postmaster.pid it finds names no running process.
        with self._server._lock:
            self._server.ensure_postgres_running()
        after = self._server.get_pid()
        return after if after != before else None

    def stop(self) -> None:
        """Let go of the server; pgserver stops the postmaster once no other process holds it."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            _log.info("postgres.embedded_released", data_dir=str(self.data_dir))


@contextmanager
def postgres_url(settings: Settings) -> Iterator[str]:
    """The database URL to use: DATABASE_URL when set, else an embedded server kept running inside the block."""
    with postgres(settings) as (url, _):
        yield url


@contextmanager
def postgres(settings: Settings) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """postgres_url's URL, and the embedded server behind it (None with DATABASE_URL)."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value(), None
        return
    server = EmbeddedPostgres(settings.postgres_data_dir)
    url = server.start()
    try:
        yield url, server
    finally:
        server.stop()
