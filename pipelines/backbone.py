"""The frozen VLM and its processor, loaded the way training loads them.

``--model`` is a local Hugging Face folder or the built-in ``autoselect-testing/tiny-llava``;
the weights come from the training job's own loader (``pipelines.train_loop.load_vlm``), so an
evaluation sees exactly the VLM a scorer was trained on. The tiny model has no files: its
processor is rebuilt in-process (``build_tiny_llava(seed=0)``).
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.train_config import TINY_LLAVA, ModelSection, TrainConfig


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_vlm_and_processor(path: str, dtype: str = "auto", device: torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """``(vlm in eval mode, processor)``; ``dtype="auto"`` is bfloat16 on GPU, float32 on CPU."""
    from pipelines.train_loop import load_vlm  # imports deepspeed: keep it out of module import time

    device = device or default_device()
    vlm = load_vlm(TrainConfig(name="evaluate", model=ModelSection(path=path, dtype=dtype)), device)
    if path == TINY_LLAVA:
        from autoselect.testing import build_tiny_llava

        processor = build_tiny_llava(seed=0)[1]
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
    return vlm.eval(), processor


def load_autoselect(source: str, vlm: torch.nn.Module, tracking_uri: str | None = None):
    """``(AutoSelectModel in eval mode, where it came from)`` from a ``save_pretrained`` folder or a
    registry URI (``models:/name@alias``, ``models:/name/3``), resolved once to an exact version."""
    from autoselect import AutoSelectModel

    if not source.startswith("models:/"):
        model = AutoSelectModel.from_pretrained(source, vlm)
        return _finite(model, source).eval(), {"path": str(source), "trained_budget": model.config.budget}
    import tempfile

    import mlflow

    from pipelines import registry
    from pipelines.train_config import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    version = registry.resolve_version(source)
    with tempfile.TemporaryDirectory(prefix="autoselect-scorer-") as workdir:  # weights are copied into the model
        directory = registry.download_autoselect(f"models:/{version.name}/{version.version}", workdir)
        model = AutoSelectModel.from_pretrained(directory, vlm)
    _finite(model, source)
    info = {
        "uri": source,
        "registered_model": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "trained_budget": model.config.budget,
    }
    return model.eval(), info


def _finite(model, source: str):
    """Refuse a scorer whose weights hold NaN/inf (a diverged run): its top-K would be arbitrary."""
    bad = [name for name, p in model.trainable_modules().named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the AutoSelect scorer from {source} has non-finite weights in {', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}: did its training diverge?")
    return model
