"""The mini-LLaVA with its aligned projector (and, optionally, the LM LoRA trained with it): save /
load the projector on its own, and build the aligned VLM from the cached parts plus the committed
projector file (+ an ``lm_lora.safetensors``, merged into the LM weights by ``minillava.lora``).

The projector artifact is ``multi_modal_projector``'s weights (~2 MB) with, in the safetensors
metadata, what they were trained against: the two source weight files (by hash) and the assembly
settings. Loading refuses a VLM built from anything else, and so does merging an adapter.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from minillava.cache import Built, cached_build
from minillava.lora import IDENTITY_KEY, lora_file, merge_lora, read_lora
from minillava.mini_llava import DEFAULT_CACHE_DIR, MiniLlavaSettings, build_mini_llava

PROJECTOR = "multi_modal_projector"
DEFAULT_PROJECTOR = Path(__file__).resolve().parents[1] / "artifacts" / "mini-llava" / "projector.safetensors"
_META_KEY = IDENTITY_KEY  # the adapter file records its backbone under the same key


def backbone_identity(built: dict[str, Built]) -> dict[str, Any]:
    """What a projector is tied to: the DINOv2 and SmolLM2 source files and the assembly settings
    (not the converter code, which may change without changing a weight)."""
    inputs = built["mini_llava"].inputs
    return {
        "dinov2_file_sha256": inputs["dinov2"]["file_sha256"],
        "smollm2_file_sha256": inputs["smollm2"]["file_sha256"],
        "settings": inputs["settings"],
    }


def projector_module(vlm: LlavaForConditionalGeneration) -> torch.nn.Module:
    return getattr(vlm.model, PROJECTOR)


def save_projector(vlm: LlavaForConditionalGeneration, path: str | Path, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """The projector's weights in float32, with ``identity`` (and ``extra``) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in projector_module(vlm).state_dict().items()}
    metadata = {"format": "pt", _META_KEY: json.dumps(identity, sort_keys=True)}
    if extra:
        metadata["run"] = json.dumps(extra, sort_keys=True)
    save_file(state, str(path), metadata=metadata)
    return path


def projector_identity(path: str | Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _META_KEY not in metadata:
        raise ValueError(f"{path} has no {_META_KEY!r} metadata; it was not written by save_projector")
    return json.loads(metadata[_META_KEY])


def load_projector(vlm: LlavaForConditionalGeneration, path: str | Path, identity: dict[str, Any] | None = None) -> None:
    """Load the projector weights in place (strict); with ``identity``, first check that the file
    was trained against the same backbone."""
    if identity is not None:
        trained_on = projector_identity(path)
        if trained_on != identity:
            raise ValueError(f"{path} was trained against another mini-LLaVA: {trained_on} != {identity}")
    module = projector_module(vlm)
    dtype = next(module.parameters()).dtype
    module.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()}, strict=True)


def load_aligned_mini_llava(
    projector: str | Path = DEFAULT_PROJECTOR,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    dtype: torch.dtype = torch.float32,
    lora: str | Path | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build (or reuse) the mini-LLaVA with the settings the projector was trained with, load the
    aligned projector into it and, with ``lora`` (an ``lm_lora.safetensors`` or its run folder),
    merge that adapter into the LM weights (in float32, before the cast to ``dtype``); returns
    ``(vlm in eval mode, processor)``. Both files must name the backbone that was built."""
    trained_on = projector_identity(projector)
    if lora is not None:
        _check_lora_matches(lora, projector, trained_on)
    settings = MiniLlavaSettings(**trained_on["settings"])
    built = build_mini_llava(cache_dir=cache_dir, settings=settings)
    identity = backbone_identity(built)
    vlm = LlavaForConditionalGeneration.from_pretrained(built["mini_llava"].path, dtype=dtype if lora is None else torch.float32).eval()
    load_projector(vlm, projector, identity)
    if lora is not None:
        merge_lora(vlm, lora, identity)
        vlm = vlm.to(dtype)
    return vlm, LlavaProcessor.from_pretrained(built["mini_llava"].path)


def _check_lora_matches(lora: str | Path, projector: str | Path, trained_on: dict[str, Any]) -> None:
    """Refuse, before any build, an adapter trained against another backbone than the projector."""
    adapter_on, _ = read_lora(lora)
    if adapter_on != trained_on:
        raise ValueError(f"LoRA adapter {lora_file(lora)} was trained against another mini-LLaVA backbone than "
                         f"the projector {projector}: {adapter_on} != {trained_on}")


def save_aligned_model(vlm: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | Path, notes: dict[str, Any] | None = None) -> Path:
    """A full model folder (LlavaForConditionalGeneration / AutoProcessor ``from_pretrained``)."""
    out_dir = Path(out_dir)
    vlm.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    if notes is not None:
        (out_dir / "alignment.json").write_text(json.dumps(notes, indent=2, sort_keys=True) + "\n")
    return out_dir


DEFAULT_ALIGNED_DIR = Path(DEFAULT_CACHE_DIR) / "mini-llava-aligned"


def aligned_inputs(projector: str | Path, lora: str | Path | None = None) -> dict[str, Any]:
    """What an aligned build depends on (its manifest's inputs): the projector (by hash) and the
    backbone it names and, with ``lora``, the adapter's sha256, rank, alpha and targets. Without
    an adapter this is what it always was, so a folder built before adapters existed is reused."""
    projector = Path(projector)
    inputs = {"projector_sha256": hashlib.sha256(projector.read_bytes()).hexdigest(), "backbone": projector_identity(projector)}
    if lora is not None:
        lora = lora_file(lora)
        _check_lora_matches(lora, projector, inputs["backbone"])
        _, settings = read_lora(lora)
        inputs["lora"] = {"sha256": hashlib.sha256(lora.read_bytes()).hexdigest(), "rank": settings.rank,
                          "alpha": settings.alpha, "targets": list(settings.targets)}
    return inputs


def build_aligned_mini_llava(
    projector: str | Path = DEFAULT_PROJECTOR,
    out_dir: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    force: bool = False,
    lora: str | Path | None = None,
) -> Built:
    """A full model folder of the mini-LLaVA with ``projector`` loaded and ``lora`` (optional, an
    ``lm_lora.safetensors`` or its run folder) merged into its LM (default
    ``<cache_dir>/mini-llava-aligned``), rebuilt only when the projector, the adapter or the
    backbone changed (``aligned_inputs``)."""
    projector = Path(projector)
    lora = lora_file(lora) if lora is not None else None
    out_dir = Path(out_dir) if out_dir is not None else Path(cache_dir) / DEFAULT_ALIGNED_DIR.name
    inputs = aligned_inputs(projector, lora)

    def build(staging: Path) -> None:
        vlm, processor = load_aligned_mini_llava(projector, cache_dir, lora=lora)
        notes = {"projector": str(projector), **({"lora_file": str(lora)} if lora is not None else {}), **inputs}
        save_aligned_model(vlm, processor, staging, notes)

    return cached_build(out_dir, inputs, build, force)


__all__ = [
    "DEFAULT_ALIGNED_DIR",
    "DEFAULT_PROJECTOR",
    "aligned_inputs",
    "build_aligned_mini_llava",
    "PROJECTOR",
    "backbone_identity",
    "load_aligned_mini_llava",
    "load_projector",
    "projector_identity",
    "save_aligned_model",
    "save_projector",
]
