"""The one settings object: environment variables and `.env`, validated once at start-up."""

from __future__ import annotations

import re
from datetime import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.codec import EncryptionCodec, parse_keys
from core.errors import ConfigurationError
from core.usage import DEFAULT_PRICES, ModelPrice
from schemas.usage import Limits

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

LOCAL_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded model (clients.llm runs it)

Environment = Literal["development", "staging", "production"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LogFormat = Literal["json", "console"]
WorkerRole = Literal["all", "turns", "background"]

# Values people leave in a copied .env; refused outside development.
_PLACEHOLDER = re.compile(r"^(|changeme|change[-_ ]?me.*|placeholder|secret|password|xxx+|todo|dummy|test|example.*|your[-_ ].*|<.*>|\.\.\.)$",
                          re.IGNORECASE)
_SECRET_FIELDS = ("openai_api_key", "pinecone_api_key", "telegram_bot_token", "telegram_webhook_secret",
                  "temporal_api_key", "database_url", "codec_server_token")
# Secrets that are not checked for placeholders (their own validation is stricter), never shown in an error either.
_KEY_FIELDS = ("payload_keys",)
_POSTGRES_SCHEMES = {"postgres", "postgresql", "postgresql+asyncpg", "postgresql+psycopg", "postgresql+psycopg2"}
_DATABASE_URL_FORMS = ("postgresql://user:pass@host:5432/db or postgresql://user@/db?host=/socket/dir")
# A process's PostgreSQL pool (storage.database.create_engine): connections kept open, and how many more a burst may
# open. Two turn workers of a load run answered as many turns a second with 10 + 5 each as with 30 + 10, and held
# 35-40 connections between them and the background worker rather than 71-78.
DATABASE_POOL_SIZE = 10
DATABASE_MAX_OVERFLOW = 5


class Settings(BaseSettings):
    """Every knob of the companion; unset keys mean the embedded, offline defaults."""

    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", validate_default=True)

    environment: Environment = "development"
    log_level: LogLevel = "INFO"
    log_format: LogFormat | None = Field(default=None, description="json|console; default console in development")
    companion_data_dir: Path = Path(".companion")

    database_url: SecretStr | None = None
    # Connections a worker keeps open, and how many more it may open for a burst (closed again after it). Every
    # process sharing the server counts against its max_connections (100 unless raised): docker-compose.yml
    # budgets them.
    database_pool_size: int = Field(default=DATABASE_POOL_SIZE, ge=1, le=500)
    database_max_overflow: int = Field(default=DATABASE_MAX_OVERFLOW, ge=0, le=500)

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "companion"
    # Temporal Cloud or a TLS cluster: an API key, or a client certificate and key (mTLS). Either turns TLS on.
    temporal_api_key: SecretStr | None = None
    temporal_tls_client_cert_path: Path | None = None
    temporal_tls_client_key_path: Path | None = None
    # Workers join this Worker Deployment with a build id: COMPANION_BUILD_ID, or one derived from the workflow's
    # code, so that a changed workflow gets a new one by itself. A conversation stays on the build it runs on and
    # moves to the deployment's current build at its next turn.
    temporal_deployment_name: str = Field(default="companion", pattern=r"^[A-Za-z0-9_.-]{1,200}$")
    companion_build_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,200}$")
    workflow_turns_per_run: int = Field(default=200, ge=1, le=10_000)
    # ~100 KB of worker memory per cached workflow; users beyond it are replayed from history when they write.
    worker_max_cached_workflows: int = Field(default=500, ge=0)
    # Run workflow code in Temporal's sandbox, which refuses nondeterministic calls (the clock, randomness, I/O) as
    # they happen. It cost the worker 5-17% of its CPU a turn in load runs; off, CI's sandboxed tests and the replays
    # of the recorded histories are what guard determinism.
    workflow_sandbox: bool = True
    # What a worker process takes: `all`; `turns`, the workflows, their local steps and the LLM steps (replies and
    # nudges written by the LLM); `background`, the remember steps only, at a lower CPU priority. It paid off beside
    # two or more turn workers; beside a single one it did not (docs/operations.md).
    worker_role: WorkerRole = "all"
    # host:port where the worker serves Prometheus metrics (Temporal SDK's and the companion's); unset = none.
    metrics_address: str | None = None
    # OTLP/HTTP collector (e.g. http://otel-collector:4318): the worker sends traces of workflows and activities.
    otel_exporter_otlp_endpoint: str | None = None

    # AES-256-GCM keys of every Temporal payload (core.codec): ID:KEY pairs, comma-separated; the first encrypts, all
    # decrypt (rotate by putting a new key first; `companion keys new` makes one). Unset: payloads travel and rest in
    # clear (development only; required in production).
    payload_keys: SecretStr | None = None
    # The bearer token the codec server (`companion codec-server`) asks of the Temporal UI and CLI; unset = none.
    codec_server_token: SecretStr | None = None

    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_chat_model: str = "gpt-4o-mini"
    openai_embedding_model: str = "text-embedding-3-small"
    # Replies are streamed from the LLM and shown as they are written (a Telegram draft, a message edited as it
    # grows in a group, the terminal chat); false for an OpenAI-compatible server that cannot stream.
    llm_stream: bool = True
    # A reply's prompt holds at most this many tokens of the user's memory (the quoted profile and the memories
    # recalled for the message) and of the recent conversation; the embedded model has smaller budgets of its own.
    memory_prompt_tokens: int = Field(default=1_500, ge=100, le=100_000)
    history_prompt_tokens: int = Field(default=6_000, ge=100, le=1_000_000)
    # Voice notes and audio are transcribed by this model of the OpenAI-compatible audio.transcriptions endpoint, at
    # TRANSCRIBE_BASE_URL (e.g. a local Whisper server; its key is OPENAI_API_KEY, or none) or else the LLM's.
    transcribe_model: str = "gpt-4o-mini-transcribe"
    transcribe_base_url: str | None = None
    # Photos are described by this vision-capable chat model (unset: OPENAI_CHAT_MODEL), at the LLM's endpoint.
    vision_model: str | None = None
    # Longer voice notes and audio are declined before anything is downloaded.
    max_voice_seconds: int = Field(default=300, ge=1, le=3_600)
    # Prices in USD, JSON by model: {"my-model": {"input": 0.5, "output": 1.5, "cached_input": 0.25}} per million
    # tokens, or {"audio_minute": 0.006}; over the built-in table of OpenAI's models (core.usage.DEFAULT_PRICES).
    # A model in neither costs 0, and its usage is flagged as unpriced.
    model_prices: dict[str, ModelPrice] = Field(default_factory=dict)
    # What a user may spend a day (from midnight in their time zone), in USD and/or tokens; unset = no limit. Over it,
    # they are told when it resets and the model is not asked. `companion users set --unlimited` exempts a user.
    user_daily_budget_usd: float | None = Field(default=None, gt=0)
    user_daily_tokens: int | None = Field(default=None, gt=0)
    # Messages a user may send a minute and be answered by the model; more are kept and told to slow down. 0 = no limit.
    user_messages_per_minute: int = Field(default=20, ge=0, le=10_000)
    # The LLM steps' rate across every worker (the LLM task queue's activities a second); unset = no limit.
    llm_max_requests_per_second: float | None = Field(default=None, gt=0, le=10_000)
    # A message waits at most this long for its reply, LLM retries included; then the user gets the fallback reply.
    reply_deadline_seconds: int = Field(default=45, ge=5, le=600)

    # In each remember step, an LLM call extracts facts, events, milestones and reminders (the turns' messages are
    # remembered either way). "auto" = on with OpenAI or OPENAI_BASE_URL, off with the embedded 135M model, whose
    # constrained JSON is well-formed but empty of meaning (it repeats one made-up fact) and costs ~15 s of CPU.
    memory_extraction: Literal["auto", "on", "off"] = "auto"
    # The remember step (indexing and extraction) runs once the user has been quiet this long, for all the turns
    # since the last one (at most 5); 0 = after every turn. A burst of messages costs one embeddings call and one
    # extraction, and the turns waiting are still in the prompt's recent conversation.
    remember_after_quiet_seconds: int = Field(default=60, ge=0, le=3_600)
    # The embedder of semantic memory: "local" (all-MiniLM-L6-v2, offline), "openai" (OPENAI_EMBEDDING_MODEL), or
    # "auto": OpenAI's when OPENAI_API_KEY is set, else local. Changing it needs `companion memory reindex`.
    embedding_provider: Literal["auto", "local", "openai"] = "auto"
    # The vector size of an OpenAI-compatible embedding model the companion doesn't know (e.g. one served by Ollama).
    embedding_dimension: int | None = Field(default=None, ge=1, le=16_000)

    pinecone_api_key: SecretStr | None = None
    pinecone_index: str = "companion-memory"
    # The index's data-plane host (from the Pinecone console); unset = looked up by PINECONE_INDEX, and created
    # (serverless, cosine) in PINECONE_CLOUD / PINECONE_REGION when it doesn't exist.
    pinecone_host: str | None = None
    pinecone_cloud: str = "aws"
    pinecone_region: str = "us-east-1"

    # Nudges due in these hours of the user's local time wait until the end of them; "off" = no quiet hours.
    nudge_quiet_hours: str | None = "22:00-08:00"
    # The companion checks in after this many days of silence from a user; 0 = never (users can say /quiet).
    checkin_after_days: int = Field(default=3, ge=0, le=365)

    telegram_bot_token: SecretStr | None = None
    telegram_api_base_url: str = "https://api.telegram.org/bot"
    telegram_webhook_url: str | None = None
    telegram_webhook_secret: SecretStr | None = None
    telegram_webhook_listen: str = "0.0.0.0"
    telegram_webhook_port: int = Field(default=8443, ge=1, le=65535)
    # Empty = everyone may talk to the bot; else only these Telegram user ids (comma-separated in the environment).
    telegram_allowed_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    # These Telegram users see everyone's usage with /usage (comma-separated).
    telegram_admin_user_ids: Annotated[frozenset[int], NoDecode] = frozenset()
    telegram_max_message_chars: int = Field(default=4_000, ge=1, le=16_000)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("companion_data_dir")
    @classmethod
    def _absolute_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # Imported here: commands that need no database start without SQLAlchemy.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value.get_secret_value())
        except ArgumentError:
            raise ValueError(f"expected {_DATABASE_URL_FORMS}") from None
        if url.drivername not in _POSTGRES_SCHEMES:
            raise ValueError(f"expected a PostgreSQL URL ({_DATABASE_URL_FORMS}), not scheme {url.drivername!r}")
        if not url.database:
            raise ValueError(f"expected a database name in the URL ({_DATABASE_URL_FORMS})")
        if not url.host and "host" not in url.query:
            raise ValueError(f"expected a host, or ?host=/socket/dir ({_DATABASE_URL_FORMS})")
        return value

    @field_validator("temporal_address", "metrics_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected host:port, e.g. localhost:7233")
        return value

    @field_validator("openai_base_url", "transcribe_base_url", "telegram_api_base_url", "otel_exporter_otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("expected an http(s) URL, e.g. https://api.example.com/v1")
        return value

    @field_validator("telegram_webhook_url")
    @classmethod
    def _https_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme != "https" or not parts.netloc:
                raise ValueError("expected the public https URL Telegram posts updates to")
        return value

    @field_validator("nudge_quiet_hours")
    @classmethod
    def _hours_range(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "off", "none"):
            return None
        if parse_hours(value) is None:
            raise ValueError("expected a range of local times HH:MM-HH:MM, e.g. 22:00-08:00")
        return value

    @field_validator("telegram_allowed_user_ids", "telegram_admin_user_ids", mode="before")
    @classmethod
    def _id_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            items = [item for item in re.split(r"[\s,]+", value.strip()) if item]
            if not all(re.fullmatch(r"\d{1,19}", item) for item in items):
                raise ValueError("expected Telegram user ids separated by commas, e.g. 12345,67890")
            return frozenset(int(item) for item in items)
        return value

    @field_validator("payload_keys", "codec_server_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("payload_keys")
    @classmethod
    def _payload_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_keys(value.get_secret_value())  # a ValueError names what is wrong, never the key
        return value

    @field_validator("telegram_bot_token")
    @classmethod
    def _bot_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(r"\d+:[A-Za-z0-9_-]{20,}", value.get_secret_value()):
            raise ValueError("expected a bot token from @BotFather, like 123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11")
        return value

    @field_validator("telegram_webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # Telegram's own rule for secret_token.
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", value.get_secret_value()):
            raise ValueError("expected 1-256 characters of A-Z, a-z, 0-9, _ and -")
        return value

    @field_validator("temporal_tls_client_cert_path", "temporal_tls_client_key_path")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().is_file():
            raise ValueError("expected the path of a PEM file that exists")
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if (self.temporal_tls_client_cert_path is None) != (self.temporal_tls_client_key_path is None):
            raise ValueError("TEMPORAL_TLS_CLIENT_CERT_PATH and TEMPORAL_TLS_CLIENT_KEY_PATH: expected both "
                             "(a client certificate and its key) or neither")
        if self.telegram_webhook_url and not self.telegram_webhook_secret:
            raise ValueError("TELEGRAM_WEBHOOK_SECRET: expected a secret token whenever TELEGRAM_WEBHOOK_URL is set")
        if self.environment == "production" and self.payload_keys is None:
            raise ValueError("PAYLOAD_KEYS: expected in production, so that what users write is encrypted in "
                             "Temporal (`companion keys new` makes a key)")
        if self.environment != "development":
            for name in _SECRET_FIELDS:
                if _is_placeholder(name, getattr(self, name)):
                    raise ValueError(f"{name.upper()}: expected a real secret in {self.environment}, "
                                     "not a placeholder value")
        return self

    # --- derived values -----------------------------------------------------------------------------------------

    @property
    def effective_log_format(self) -> LogFormat:
        """The log format in force: as set, else readable console in development and JSON lines elsewhere."""
        if self.log_format is not None:
            return self.log_format
        return "console" if self.environment == "development" else "json"

    @property
    def uses_local_model(self) -> bool:
        """True when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set and the embedded model answers."""
        return self.openai_api_key is None and self.openai_base_url is None

    @property
    def payload_codec(self) -> EncryptionCodec | None:
        """The codec that encrypts Temporal payloads with PAYLOAD_KEYS; None when unset."""
        return EncryptionCodec(parse_keys(self.payload_keys.get_secret_value())) if self.payload_keys else None

    @property
    def limits(self) -> Limits:
        """A user's daily limits."""
        return Limits(daily_budget_usd=self.user_daily_budget_usd, daily_tokens=self.user_daily_tokens)

    @property
    def prices(self) -> dict[str, ModelPrice]:
        """The price of each model: MODEL_PRICES over the built-in table."""
        return {**DEFAULT_PRICES, LOCAL_MODEL_NAME: ModelPrice(), **self.model_prices}  # the local model is free

    @property
    def hears_voice(self) -> bool:
        """True when voice notes can be transcribed: an OpenAI-compatible endpoint is configured for it."""
        return self.transcribe_base_url is not None or not self.uses_local_model

    @property
    def sees_photos(self) -> bool:
        """True when photos can be described: the LLM is OpenAI or a compatible server, not the embedded model."""
        return not self.uses_local_model

    @property
    def chat_model_name(self) -> str:
        """The name of the model these settings have write replies."""
        return LOCAL_MODEL_NAME if self.uses_local_model else self.openai_chat_model

    @property
    def extracts_memories(self) -> bool:
        """True when the remember step runs the LLM extraction (MEMORY_EXTRACTION)."""
        if self.memory_extraction == "auto":
            return not self.uses_local_model
        return self.memory_extraction == "on"

    @property
    def uses_openai_embeddings(self) -> bool:
        """True when semantic memory is embedded by OpenAI's (or a compatible server's) embeddings endpoint."""
        if self.embedding_provider == "auto":
            return self.openai_api_key is not None
        return self.embedding_provider == "openai"

    @property
    def uses_embedded_postgres(self) -> bool:
        """True when no DATABASE_URL is set and the companion runs its own PostgreSQL."""
        return self.database_url is None

    @property
    def quiet_hours(self) -> tuple[time, time] | None:
        """NUDGE_QUIET_HOURS as (start, end) local times, or None."""
        return None if self.nudge_quiet_hours is None else parse_hours(self.nudge_quiet_hours)

    @property
    def postgres_data_dir(self) -> Path:
        """Where the embedded PostgreSQL keeps its files."""
        return self.companion_data_dir / "postgres"


def parse_hours(value: str) -> tuple[time, time] | None:
    """"22:00-08:00" as (22:00, 08:00); None when it is no such range."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", value)
    if match is None:
        return None
    hours = [int(part) for part in match.groups()]
    if hours[0] > 23 or hours[2] > 23 or hours[1] > 59 or hours[3] > 59 or hours[:2] == hours[2:]:
        return None
    return time(hours[0], hours[1]), time(hours[2], hours[3])


def _is_placeholder(name: str, value: SecretStr | None) -> bool:
    if value is None:
        return False
    secret = value.get_secret_value()
    if name == "database_url":
        from sqlalchemy.engine import make_url

        password = make_url(secret).password
        return password is not None and bool(_PLACEHOLDER.match(password) or password == "postgres")
    return bool(_PLACEHOLDER.match(secret.strip()))


def to_async_url(url: str) -> URL:
    """A PostgreSQL URL in any accepted form, as the asyncpg URL SQLAlchemy needs."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername="postgresql+asyncpg")
    sslmode = parsed.query.get("sslmode")
    if sslmode is not None:  # libpq spelling; asyncpg calls it ssl
        parsed = parsed.difference_update_query(["sslmode"]).update_query_dict({"ssl": sslmode})
    return parsed


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value raises ConfigurationError with one line naming each bad setting."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc), context={"settings": _bad_names(exc)}) from None


def _bad_names(exc: ValidationError) -> list[str]:
    return [str(err["loc"][0]).upper() for err in exc.errors() if err["loc"]]


def _describe(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # model-level checks name their setting themselves
            problems.append(message)
            continue
        name = str(err["loc"][0])
        shown = "" if name in _SECRET_FIELDS or name in _KEY_FIELDS else f" (got {err['input']!r})"
        problems.append(f"{name.upper()}: {message[0].lower()}{message[1:]}{shown}")
    return "Invalid setting " + "; ".join(problems)
