"""Usage of the paid models: one row a call, and the totals users and operators read."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from core.usage import UsageKind


class UsageCreate(BaseModel):
    """One model call that answered, priced."""

    model_config = ConfigDict(extra="forbid")

    idempotency_key: str = Field(min_length=1, max_length=500)
    telegram_id: int
    kind: UsageKind
    model: str = Field(min_length=1, max_length=200)
    prompt_tokens: int = Field(default=0, ge=0)
    completion_tokens: int = Field(default=0, ge=0)
    cached_tokens: int = Field(default=0, ge=0)
    audio_seconds: float = Field(default=0.0, ge=0)
    images: int = Field(default=0, ge=0)
    cost_usd: float = Field(default=0.0, ge=0)
    priced: bool = True


class UsageTotals(BaseModel):
    """What a set of calls consumed and cost."""

    model_config = ConfigDict(extra="forbid")

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    audio_seconds: float = 0.0
    images: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0  # calls to a model without a price (counted at 0)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class UsageLine(UsageTotals):
    """The totals of one group of a report: a day, a model, a user."""

    group: str


class UsageSummary(BaseModel):
    """A user's usage today and this month, in their time zone (/usage), and their limits."""

    model_config = ConfigDict(extra="forbid")

    telegram_id: int | None  # None: everyone's (an admin's /usage)
    zone: str
    today: UsageTotals
    month: UsageTotals
    day_started: datetime
    daily_budget_usd: float | None = None
    daily_tokens: int | None = None
    unlimited: bool = False
    users: int | None = None  # everyone's: how many users used a model this month



class Limits(BaseModel):
    """What a user may spend a day (USER_DAILY_BUDGET_USD, USER_DAILY_TOKENS); None: no limit."""

    model_config = ConfigDict(extra="forbid")

    daily_budget_usd: float | None = None
    daily_tokens: int | None = None

    @property
    def any(self) -> bool:
        return self.daily_budget_usd is not None or self.daily_tokens is not None

    def reached(self, used: UsageTotals) -> bool:
        """True when ``used`` (a day's usage) is at or over a limit."""
        return ((self.daily_budget_usd is not None and used.cost_usd >= self.daily_budget_usd)
                or (self.daily_tokens is not None and used.tokens >= self.daily_tokens))


def money(usd: float) -> str:
    """A cost as people read it: cents to four places below a dollar."""
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.4f}"


def describe_totals(totals: UsageTotals) -> str:
    """One line: calls, tokens, audio and images, cost."""
    parts = [f"{totals.calls:,} model call{'s' if totals.calls != 1 else ''}", f"{totals.tokens:,} tokens"]
    if totals.audio_seconds:
        parts.append(f"{totals.audio_seconds / 60:.1f} min of audio")
    if totals.images:
        parts.append(f"{totals.images:,} image{'s' if totals.images != 1 else ''}")
    parts.append(money(totals.cost_usd))
    unpriced = f" ({totals.unpriced_calls:,} to models without a price, counted at $0)" if totals.unpriced_calls else ""
    return ", ".join(parts) + unpriced


def describe_usage(summary: UsageSummary) -> str:
    """What /usage answers: today and this month, and the daily limit."""
    who = "Everyone" if summary.telegram_id is None else "You"
    lines = [f"{who} ({summary.zone} days):", f"Today: {describe_totals(summary.today)}",
             f"This month: {describe_totals(summary.month)}"]
    if summary.users is not None:
        lines.append(f"Users this month: {summary.users:,}")
    elif summary.unlimited:
        lines.append("No daily limit for you.")
    elif summary.daily_budget_usd is not None or summary.daily_tokens is not None:
        limits = [money(summary.daily_budget_usd) if summary.daily_budget_usd is not None else "",
                  f"{summary.daily_tokens:,} tokens" if summary.daily_tokens is not None else ""]
        lines.append(f"Daily limit: {' or '.join(limit for limit in limits if limit)}, from midnight.")
    return "\n".join(lines)
