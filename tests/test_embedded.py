"""The embedded PostgreSQL: started in COMPANION_DATA_DIR when DATABASE_URL is unset, stopped cleanly, data kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from storage import migrate


def _postgres_processes(data_dir: Path) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if "postgres" in cmdline and str(data_dir) in cmdline and state != "Z":
            found.append(int(pid))
    return found


def _companion(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


def test_embedded_postgres_runs_in_the_data_dir_and_stops_on_exit(tmp_path: Path) -> None:
    upgraded = _companion("db", "upgrade", cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    data_dir = tmp_path / ".companion" / "postgres"
    assert (data_dir / "PG_VERSION").read_text().strip() == "16"
    assert not (data_dir / "postmaster.pid").exists()
    assert _postgres_processes(data_dir) == []

    current = _companion("db", "current", cwd=tmp_path)  # a second start finds the migrated data
    assert f"database at revision {migrate.head_revision()}" in current.stdout
    assert _postgres_processes(data_dir) == []
