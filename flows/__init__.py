"""Prefect flows: wiring only. Importing this package sets quiet, offline, project-local
defaults for Prefect and MLflow before either is imported (see ../shared/FIELD_NOTES.md)."""

import os
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_DEFAULTS = {
    "PREFECT_HOME": str(_ROOT / ".prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)
