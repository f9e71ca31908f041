"""Where MLflow is: the settings and the default that training, promotion and serving share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MlflowSection:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    experiment: str = "autoselect"
    registered_model: str = "autoselect-scorer"
    artifact_location: str | None = None  # default: outputs/mlartifacts (or the server's)
    log_system_metrics: bool = True


def resolve_tracking_uri(explicit: str | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store ``outputs/mlflow.db``.

    Shared by training, promotion and serving so all three find the same registry by default.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # relative to this process's folder: pin it, since Ray workers and replicas run elsewhere
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri
