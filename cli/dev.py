"""`companion dev`: the whole companion on one machine, with embedded Temporal, PostgreSQL and model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TEMPORAL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "temporal-config"
DEV_CONFIG = TEMPORAL_CONFIG_DIR / "development.yaml"


def dev_server_config_args(path: Path = DEV_CONFIG) -> list[str]:
    """`--dynamic-config-value KEY=JSON` flags for every unconstrained value of a dynamic config file."""
    config = yaml.safe_load(path.read_text()) or {}
    args: list[str] = []
    for key, entries in config.items():
        for entry in entries:
            if not entry.get("constraints"):
                args += ["--dynamic-config-value", f"{key}={json.dumps(entry['value'])}"]
    return args
