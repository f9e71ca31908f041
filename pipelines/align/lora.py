"""LoRA on the mini-LLaVA's LM attention during alignment (LLaVA stage 2, but with LoRA), via PEFT.

Projector-only alignment cannot learn to read a small object in a scene (docs/scenes.md): the
frozen LM has no capacity to look for it. Here PEFT injects LoRA layers, in place, into the
attention projections of ``vlm.model.language_model`` only (the vision tower has ``q_proj`` &c.
too and stays untouched), so the VLM's forward is unchanged. The base weights stay frozen in the
compute dtype; the adapters train in float32.

The artifact is the adapter's weights (``lm_lora.safetensors``, next to ``projector.safetensors``)
with, in the metadata, the same backbone identity that ``save_projector`` writes plus the LoRA
settings; loading refuses an adapter trained against another backbone. The file format and the
merge into the LM weights live in the builder (``minillava.lora``: no PEFT there), so alignment
scoring, ``--out-model`` and the mini-LLaVA build all merge it the same way and the shared
backbone stays a plain ``LlavaForConditionalGeneration``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from minillava.lora import DEFAULT_TARGETS, LoraSettings, check_identity, language_model, lora_file, read_lora, write_lora

ADAPTER = "default"  # PEFT's adapter name; one adapter at a time
_PREFIX = "lora_"  # PEFT's parameter-name prefix for LoRA weights


def peft_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets), lora_dropout=0.0, bias="none")


def has_lora(vlm) -> bool:
    return any(_PREFIX in name for name, _ in language_model(vlm).named_parameters())


def attached_settings(vlm) -> LoraSettings | None:
    """The settings of the adapter injected into ``vlm``'s LM, or None."""
    config = getattr(language_model(vlm), "peft_config", {}).get(ADAPTER)
    if config is None:
        return None
    targets = set(config.target_modules)
    ordered = tuple(t for t in DEFAULT_TARGETS if t in targets) + tuple(sorted(targets - set(DEFAULT_TARGETS)))
    return LoraSettings(config.r, config.lora_alpha, ordered)


def _attach(vlm, settings: LoraSettings) -> LoraModel:
    lm = language_model(vlm)
    if hasattr(lm, "peft_config") or has_lora(vlm):
        raise ValueError("the language model already carries a LoRA adapter")
    # LoraModel injects in place and marks only the adapters of `lm` trainable (the rest of the VLM
    # is left as it was)
    tuner = LoraModel(lm, peft_config(settings), ADAPTER)
    if not has_lora(vlm):
        raise ValueError(f"no module of the language model matches the LoRA targets {settings.targets}")
    return tuner


def lora_parameters(vlm) -> list[torch.nn.Parameter]:
    """The adapter's weights, made float32 and trainable (PEFT creates them in the base layer's
    dtype; LoRA layers cast their input to the adapter dtype and the sum back to the base dtype)."""
    params = []
    for name, param in language_model(vlm).named_parameters():
        if _PREFIX in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
            params.append(param)
    return params


def add_lora(vlm, settings: LoraSettings) -> list[torch.nn.Parameter]:
    """Inject a fresh LoRA (B = 0, so the VLM computes what it did) into the LM's attention;
    returns its float32 trainable parameters."""
    _attach(vlm, settings)
    return lora_parameters(vlm)


def save_lora(vlm, path: str | Path, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """The attached adapter's weights in float32, with ``identity`` (as ``save_projector``), the
    LoRA settings (and ``extra``) in the metadata (``minillava.lora.write_lora``)."""
    settings = attached_settings(vlm)
    if settings is None:
        raise ValueError("the language model carries no LoRA adapter to save")
    return write_lora(get_peft_model_state_dict(language_model(vlm), adapter_name=ADAPTER), path, identity, settings, extra)


def load_lora(vlm, path: str | Path, identity: dict[str, Any] | None = None) -> list[torch.nn.Parameter]:
    """Attach a saved adapter (unmerged, e.g. to continue training); with ``identity``, first
    check it was trained against the same backbone. Returns its float32 parameters. To use an
    adapter rather than train it, merge it: ``minillava.lora.merge_lora``."""
    path = lora_file(path)
    trained_on, settings = read_lora(path)
    check_identity(path, trained_on, identity)
    _attach(vlm, settings)
    result = set_peft_model_state_dict(language_model(vlm), load_file(str(path)), adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if _PREFIX in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the language model: missing {missing}, unexpected {result.unexpected_keys}")
    return lora_parameters(vlm)


__all__ = [
    "add_lora",
    "attached_settings",
    "has_lora",
    "load_lora",
    "lora_parameters",
    "peft_config",
    "save_lora",
]
