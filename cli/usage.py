"""`companion usage`: what the paid model calls used and cost, per day, model, kind or user, as a table."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

from cli.conversation import open_repository
from core.settings import Settings
from schemas.usage import UsageLine, UsageTotals, money

COLUMNS = ("calls", "prompt tokens", "completion tokens", "audio min", "images", "cost")


async def usage_report(settings: Settings, telegram_id: int | None, since: date | None, by: str) -> int:
    """Print the usage table (days in UTC), its total last; unpriced calls are counted at $0 and flagged."""
    start = datetime.combine(since, time(0), tzinfo=UTC) if since is not None else None
    async with open_repository(settings) as repository:
        lines = await repository.usage_report(telegram_id, start, by=by)
    who = f"user {telegram_id}" if telegram_id is not None else "every user"
    print(f"usage of {who}{f' since {since:%Y-%m-%d}' if since else ''}, by {by}" + (" (UTC)" if by == "day" else ""))
    if not lines:
        print("no model calls")
        return 0
    total = UsageTotals(**{field: sum(getattr(line, field) for line in lines)
                           for field in UsageTotals.model_fields})
    rows = [_cells(line.group, line) for line in lines] + [_cells("total", total)]
    widths = [max(len(row[n]) for row in [[by, *COLUMNS], *rows]) for n in range(len(COLUMNS) + 1)]
    for row in [[by, *COLUMNS], *rows]:
        print("  ".join(cell.ljust(widths[0]) if n == 0 else cell.rjust(widths[n]) for n, cell in enumerate(row)))
    if total.unpriced_calls:
        print(f"{total.unpriced_calls:,} calls to models without a price were counted at $0: add them to MODEL_PRICES")
    return 0


def _cells(group: str, totals: UsageTotals | UsageLine) -> list[str]:
    flag = " *" if totals.unpriced_calls else ""
    return [group + flag, f"{totals.calls:,}", f"{totals.prompt_tokens:,}", f"{totals.completion_tokens:,}",
            f"{totals.audio_seconds / 60:.1f}", f"{totals.images:,}", money(totals.cost_usd)]
