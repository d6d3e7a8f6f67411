"""Settings: embedded defaults, accepted URL forms, and one clear line for every bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.errors import ConfigurationError
from core.settings import Settings, load_settings, to_async_url
from workflows.client import connect_options

BOT_TOKEN = "123456789:AAH9xYzQ1w2e3r4t5y6u7i8o9p0asdfghjk"
PAYLOAD_KEYS = "k20261206-test01:Pk6-KROQH5b_Hsu69_siKPX2Bquvp73xJR-CvXj-flA"  # production requires one


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read .env from the working directory; give every test an empty one of its own.
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_embedded_offline_stack(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.uses_embedded_postgres
    assert settings.temporal_address == "localhost:7233"
    assert settings.telegram_api_base_url == "https://api.telegram.org/bot"
    assert settings.companion_data_dir == tmp_path / ".companion"
    assert settings.effective_log_format == "console"
    assert load_settings(environment="production", payload_keys=PAYLOAD_KEYS).effective_log_format == "json"


def test_dotenv_file_is_read_and_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("TEMPORAL_NAMESPACE=from-file\nTEMPORAL_TASK_QUEUE=file-queue\nLOG_LEVEL=\n")
    monkeypatch.setenv("TEMPORAL_TASK_QUEUE", "env-queue")
    settings = load_settings()
    assert settings.temporal_namespace == "from-file"
    assert settings.temporal_task_queue == "env-queue"
    assert settings.log_level == "INFO"  # an empty value means "unset"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://me:pw@db.example.com:5432/companion", "postgresql+asyncpg://me:pw@db.example.com:5432/companion"),
        ("postgres://me:pw@db:5432/companion", "postgresql+asyncpg://me:pw@db:5432/companion"),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", "postgresql+asyncpg://postgres:@/postgres?host=%2Ftmp%2Fpg"),
        ("postgresql+asyncpg://me:pw@db/companion", "postgresql+asyncpg://me:pw@db/companion"),
        ("postgresql://me:pw@db/companion?sslmode=require", "postgresql+asyncpg://me:pw@db/companion?ssl=require"),
    ],
)
def test_database_url_forms_are_accepted(url: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    settings = load_settings()
    assert not settings.uses_embedded_postgres
    assert to_async_url(settings.database_url.get_secret_value()).render_as_string(hide_password=False) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LOG_LEVEL", "loud", "LOG_LEVEL: input should be 'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT: input should be 'json' or 'console'"),
        ("ENVIRONMENT", "prod", "ENVIRONMENT: input should be 'development', 'staging' or 'production'"),
        ("DATABASE_URL", "mysql://u:p@h/db", "DATABASE_URL: expected a PostgreSQL URL"),
        ("DATABASE_URL", "not a url", "DATABASE_URL: expected postgresql://user:pass@host:5432/db"),
        ("DATABASE_URL", "postgresql://u:p@host:5432", "DATABASE_URL: expected a database name"),
        ("TEMPORAL_ADDRESS", "localhost", "TEMPORAL_ADDRESS: expected host:port"),
        ("TEMPORAL_ADDRESS", "localhost:99999", "TEMPORAL_ADDRESS: expected host:port"),
        ("OPENAI_BASE_URL", "localhost:8080/v1", "OPENAI_BASE_URL: expected an http(s) URL"),
        ("TELEGRAM_API_BASE_URL", "ftp://x/bot", "TELEGRAM_API_BASE_URL: expected an http(s) URL"),
        ("TELEGRAM_BOT_TOKEN", "not-a-token", "TELEGRAM_BOT_TOKEN: expected a bot token from @BotFather"),
        ("TELEGRAM_WEBHOOK_URL", "http://bot.example.com/hook", "TELEGRAM_WEBHOOK_URL: expected the public https URL"),
        ("TELEGRAM_WEBHOOK_SECRET", "has spaces!", "TELEGRAM_WEBHOOK_SECRET: expected 1-256 characters"),
        ("TELEGRAM_WEBHOOK_PORT", "70000", "TELEGRAM_WEBHOOK_PORT: input should be less than or equal to 65535"),
        ("TELEGRAM_WEBHOOK_PORT", "eighty", "TELEGRAM_WEBHOOK_PORT: input should be a valid integer"),
    ],
)
def test_each_bad_setting_gets_one_clear_line(name: str, value: str, message: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    text = str(caught.value)
    assert text.startswith("Invalid setting ")
    assert message in text
    assert "\n" not in text
    assert caught.value.context["settings"] == [name]


def test_secret_values_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "12345:tooshort-but-secret")
    monkeypatch.setenv("DATABASE_URL", "mysql://user:hunter2@db/x")
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert "tooshort-but-secret" not in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_webhook_url_requires_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_WEBHOOK_URL", "https://bot.example.com/hook")
    with pytest.raises(ConfigurationError, match="TELEGRAM_WEBHOOK_SECRET: expected a secret token"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPENAI_API_KEY", "changeme"),
        ("OPENAI_API_KEY", "your-openai-key"),
        ("PINECONE_API_KEY", "<pinecone key>"),
        ("DATABASE_URL", "postgresql://companion:changeme@db:5432/companion"),
        ("DATABASE_URL", "postgresql://postgres:postgres@db:5432/companion"),
    ],
)
def test_production_refuses_placeholder_secrets(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    load_settings()  # fine while developing
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("PAYLOAD_KEYS", PAYLOAD_KEYS)
    with pytest.raises(ConfigurationError, match=f"{name}: expected a real secret in production"):
        load_settings()


def test_production_accepts_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    monkeypatch.setenv("PAYLOAD_KEYS", PAYLOAD_KEYS)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-9f8e7d6c5b4a39281706")
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("DATABASE_URL", "postgresql://companion:Xk29-fjq81@db:5432/companion")
    settings = load_settings()
    assert settings.openai_api_key.get_secret_value() == "sk-live-9f8e7d6c5b4a39281706"


def test_secrets_do_not_show_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("DATABASE_URL", "postgresql://companion:Xk29-fjq81@db:5432/companion")
    shown = repr(load_settings()) + str(load_settings().model_dump())
    assert BOT_TOKEN not in shown
    assert "Xk29-fjq81" not in shown


def test_cli_stops_with_one_line_on_a_bad_setting(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "TEMPORAL_ADDRESS": "nowhere", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "cli", "db", "current"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "companion: Invalid setting TEMPORAL_ADDRESS: expected host:port, e.g. localhost:7233 (got 'nowhere')"]


def test_env_example_lists_every_setting_and_loads_as_is(tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    names = [line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")]
    assert sorted(names) == sorted(field.upper() for field in Settings.model_fields)
    lines = example.splitlines()
    for name in names:  # each setting has its one-line comment right above it
        above = lines[lines.index(next(line for line in lines if line.startswith(f"{name}="))) - 1]
        assert above.startswith("# "), name
    (tmp_path / ".env").write_text(example)
    assert load_settings().uses_embedded_postgres


def test_temporal_cloud_api_key_and_mtls_reach_the_client_options(tmp_path: Path) -> None:
    assert connect_options(load_settings()) == {"target_host": "localhost:7233", "namespace": "default"}

    cloud = connect_options(load_settings(temporal_address="ns.acct.tmprl.cloud:7233", temporal_namespace="ns.acct",
                                          temporal_api_key="tcld-key-123"))
    assert cloud == {"target_host": "ns.acct.tmprl.cloud:7233", "namespace": "ns.acct", "api_key": "tcld-key-123",
                     "tls": True}

    (tmp_path / "client.pem").write_text("CERT")
    (tmp_path / "client.key").write_text("KEY")
    mtls = connect_options(load_settings(temporal_tls_client_cert_path=tmp_path / "client.pem",
                                         temporal_tls_client_key_path=tmp_path / "client.key"))
    assert (mtls["tls"].client_cert, mtls["tls"].client_private_key) == (b"CERT", b"KEY")

    with pytest.raises(ConfigurationError, match="expected both"):
        load_settings(temporal_tls_client_cert_path=tmp_path / "client.pem")
    with pytest.raises(ConfigurationError, match="TEMPORAL_TLS_CLIENT_KEY_PATH: expected the path of a PEM file"):
        load_settings(temporal_tls_client_cert_path=tmp_path / "client.pem",
                      temporal_tls_client_key_path=tmp_path / "missing.key")
