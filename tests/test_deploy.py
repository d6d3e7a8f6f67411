"""The production deployment files, held to the code: docker-compose.yml, the Dockerfile, temporal-config/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from core.codec import new_key_line
from core.settings import Settings, load_settings

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
APP_SERVICES = ("migrate", "worker", "worker-background", "gateway", "codec-server")


def test_every_service_of_the_stack_is_there() -> None:
    assert set(SERVICES) == {"postgres", "temporal", "temporal-admin-tools", "temporal-ui", *APP_SERVICES}
    assert SERVICES["postgres"]["image"].startswith("pgvector/pgvector:")
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "postgres-data" in COMPOSE["volumes"]


def test_services_wait_for_what_they_need_to_be_healthy() -> None:
    for name in ("postgres", "temporal"):
        assert SERVICES[name]["healthcheck"]["test"], name
    assert SERVICES["temporal"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("worker", "worker-background"):
        assert SERVICES[name]["depends_on"] == {"temporal": {"condition": "service_healthy"},
                                                 "migrate": {"condition": "service_completed_successfully"}}
    assert SERVICES["gateway"]["depends_on"] == {"temporal": {"condition": "service_healthy"}}
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"] and SERVICES["migrate"]["restart"] == "no"


def test_workers_scale_they_have_no_fixed_name_or_host_port() -> None:
    for name in ("worker", "worker-background"):
        worker = SERVICES[name]
        assert "container_name" not in worker and "ports" not in worker
        assert worker["command"] == ["worker"]
    assert SERVICES["gateway"]["command"] == ["gateway"]


def test_the_stack_answers_turns_and_remembers_them() -> None:
    # Turn workers take no regular activity: without a background worker, nothing would ever be remembered.
    roles = {name: load_settings(worker_role=SERVICES[name]["environment"]["WORKER_ROLE"]).worker_role
             for name in ("worker", "worker-background")}
    assert roles == {"worker": "turns", "worker-background": "background"}
    assert SERVICES["worker"]["deploy"]["replicas"] == 2  # a worker's turns take one core; the host has two


def test_the_stack_keeps_within_the_connections_postgres_allows() -> None:
    # A server out of connections refuses new ones: every process's most, together, must fit, with the workers
    # scaled as the file's header shows (three turn workers) and an operator's command running beside them.
    arguments = SERVICES["postgres"]["command"]
    allowed = int(next(arg.split("=", 1)[1] for arg in arguments if arg.startswith("max_connections=")))
    temporal = SERVICES["temporal"]["environment"]
    held_by_temporal = int(temporal["SQL_MAX_CONNS"]) + int(temporal["SQL_VIS_MAX_CONNS"])
    settings = load_settings()
    per_process = settings.database_pool_size + settings.database_max_overflow
    assert "--scale worker=3" in (ROOT / "docker-compose.yml").read_text()
    processes = 3 + 1 + 1 + 1  # turn workers, the background worker, the migrations, an operator's command
    reserved_for_superusers = 3  # PostgreSQL's default
    assert held_by_temporal + processes * per_process <= allowed - reserved_for_superusers


def test_the_app_services_set_only_real_settings_and_a_database_url_production_accepts() -> None:
    fields = {name.upper() for name in Settings.model_fields}
    for name in APP_SERVICES:
        service = SERVICES[name]
        assert service["env_file"] == ".env" and service["image"] == "companion:latest"
        unknown = set(service["environment"]) - fields
        assert not unknown, f"{name} sets {unknown}, which no setting reads"
    environment = SERVICES["worker"]["environment"]
    url = environment["DATABASE_URL"].replace("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}", "Xk29-long-pass")
    settings = load_settings(environment="production", database_url=url, payload_keys=new_key_line(),
                             temporal_address=environment["TEMPORAL_ADDRESS"],
                             metrics_address=environment["METRICS_ADDRESS"])
    assert settings.database_url is not None and settings.temporal_address == "temporal:7233"


def test_temporal_runs_on_the_committed_production_dynamic_config() -> None:
    temporal = SERVICES["temporal"]
    assert "./temporal-config:/etc/temporal/config/dynamicconfig:ro" in temporal["volumes"]
    path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    config = yaml.safe_load((ROOT / "temporal-config" / Path(path).name).read_text())
    assert config["history.transferProcessorMaxPollRPS"] == [{"value": 1000}]
    assert config["system.enableActivityEagerExecution"] == [{"value": True}]
    suggested = config["limit.historyCount.suggestContinueAsNew"][0]["value"]
    assert suggested < config["limit.historyCount.error"][0]["value"]


def test_the_image_is_multi_stage_non_root_and_runs_the_worker() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().splitlines()
    assert sum(line.startswith("FROM ") for line in dockerfile) == 2
    assert "USER companion" in dockerfile
    assert dockerfile[-2:] == ['ENTRYPOINT ["companion"]', 'CMD ["worker"]']
    assert "RUN uv sync --frozen --no-dev" in dockerfile


def test_docker_compose_validates_the_file(tmp_path: Path) -> None:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's package)")
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=Xk29-long-pass\n")
    done = subprocess.run(["docker-compose", "config", "-q"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    (tmp_path / ".env").write_text("")  # without the password the stack refuses to start, saying why
    missing = subprocess.run(["docker-compose", "config", "-q"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD in .env" in missing.stderr
