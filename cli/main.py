"""`companion`: the command line of the companion. Each subcommand loads the settings once and wires what it needs."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from alembic.util import CommandError as AlembicCommandError
from sqlalchemy.exc import SQLAlchemyError

from core.errors import CompanionError, ConfigurationError, InvalidInputError
from core.logging import configure_logging, get_logger
from core.settings import Settings, load_settings
from storage import migrate
from storage.database import create_engine, translate
from storage.embedded import postgres_url

EXIT_FAILURE = 1
EXIT_USAGE = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="companion", description="An AI companion that remembers you.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="manage the database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    up = db_commands.add_parser("upgrade", help="apply migrations (to the newest by default)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    down = db_commands.add_parser("downgrade", help="revert migrations (one step by default)")
    down.add_argument("revision", nargs="?", default="-1", help="target revision, -N steps, or base (default: -1)")
    db_commands.add_parser("current", help="print the revision the database is at")
    return parser


async def _db(settings: Settings, args: argparse.Namespace) -> int:
    with postgres_url(settings) as url:
        engine = create_engine(url)
        try:
            before = await migrate.current_revision(engine)
            if args.db_command == "upgrade":
                await migrate.upgrade(engine, args.revision)
            elif args.db_command == "downgrade":
                await migrate.downgrade(engine, args.revision)
            after = await migrate.current_revision(engine)
        except AlembicCommandError as exc:
            raise InvalidInputError(f"db {args.db_command}: {exc}", context={"revision": args.revision}) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise translate(exc, f"db {args.db_command}", {}) from exc
        finally:
            await engine.dispose()
    if args.db_command == "current":
        print(f"database at revision {after or 'base'} (newest: {migrate.head_revision()})")
    else:
        print(f"database {args.db_command}d: {before or 'base'} -> {after or 'base'}")
    return 0


def _raise_on_sigterm() -> None:
    # SIGTERM unwinds like Ctrl-C, so every `finally` runs and embedded servers stop cleanly.
    def handler(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `companion` command and return its exit status."""
    args = _build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        print(f"companion: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.effective_log_format)
    _raise_on_sigterm()
    log = get_logger("companion.cli", command=args.command)
    try:
        if args.command == "db":
            return asyncio.run(_db(settings, args))
    except CompanionError as exc:
        log.error("command.failed", **exc.to_dict())
        print(f"companion: {exc} [{exc.code}]", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
