"""The TLoRA pipeline: the stages of DESIGN §2 as cached Prefect tasks, artifacts in a store, lineage in MLflow.

Importing this package first sets offline and quiet defaults, before Prefect, MLflow or the HF libraries read
their settings: Prefect keeps its home (SQLite database, results) under ``artifacts/prefect`` with analytics
and the UI off, MLflow telemetry is off, and the HF hub is offline. Each is a default: a variable already set
in the environment wins.
"""

import os

_DEFAULTS = {
    "PREFECT_HOME": os.path.abspath(os.path.join("artifacts", "prefect")),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",  # two busy cores start the server slowly
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _name, _value in _DEFAULTS.items():
    os.environ.setdefault(_name, _value)
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect's SQLite database cannot create its folder
