"""A throwaway registry entry to try, test and benchmark the app without training a scorer.

Attaches AutoSelect to the backbone, perturbs the (untrained) scorer so different seeds rank
tokens differently, and registers it with `mlops.registry.log_and_register` in a run that
carries the given metrics, exactly as training and evaluation would.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from autoselect import AutoSelectConfig, AutoSelectModel
from mlops import registry


def register_scorer(
    tracking_uri: str,
    registered_model: str,
    *,
    backbone: str,
    budget: int | float = 16,
    seed: int = 0,
    metrics: dict[str, float] | None = None,
    alias: str | None = None,
    experiment: str = "autoselect-serve",
    artifact_location: str | None = None,
) -> str:
    """Register a randomly perturbed scorer for ``backbone``; returns the new version number."""
    from serve.engine import load_backbone

    model = AutoSelectModel.attach(load_backbone(backbone).vlm, AutoSelectConfig(budget=budget))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.scorer.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    experiment_id = registry.setup_tracking(tracking_uri, experiment, artifact_location)
    with tempfile.TemporaryDirectory() as directory, mlflow.start_run(experiment_id=experiment_id, run_name=f"seed-{seed}"):
        if metrics:
            mlflow.log_metrics(metrics)
        registered = registry.log_and_register(
            model.save_pretrained(Path(directory) / "autoselect"), registered_model,
            tags={"backbone": backbone, "budget": str(budget), "vision_width": str(model.config.vision_width)},
        )
    if alias:
        MlflowClient().set_registered_model_alias(registered_model, alias, registered["version"])
    return registered["version"]
