"""Environment for Prefect, MLflow and DVC: project-local state, no telemetry (must run before imports)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configure(server: bool = False) -> None:
    """Project-local Prefect home, analytics off; ``server`` points clients at the local API."""
    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_UI_ENABLED", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # Prefect's UI and logs show what the library said (it logs to the `mocosfl` logger).
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mocosfl")
    if server:
        os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
