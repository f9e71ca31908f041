"""LoRA on the mini-LLaVA's LM attention during alignment (LLaVA stage 2, but with LoRA), via PEFT.

Projector-only alignment cannot learn to read a small object in a scene (docs/scenes.md): the
frozen LM has no capacity to look for it. Here PEFT injects LoRA layers, in place, into the
attention projections of ``vlm.model.language_model`` only (the vision tower has ``q_proj`` &c.
too and stays untouched), so the VLM's forward is unchanged. The base weights stay frozen in the
compute dtype; the adapters train in float32.

The artifact is the adapter's weights (``lm_lora.safetensors``, next to ``projector.safetensors``)
with, in the metadata, the same backbone identity that ``save_projector`` writes plus the LoRA
settings; loading refuses an adapter trained against another backbone. For every consumer the
adapter is *merged* into the LM weights (``merge_lora``), so the shared backbone stays a plain
``LlavaForConditionalGeneration`` and nothing downstream needs PEFT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, LoraModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "lm_lora.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER = "default"  # PEFT's adapter name; one adapter at a time
_PREFIX = "lora_"  # PEFT's parameter-name prefix for LoRA weights
_IDENTITY_KEY = "mini_llava"  # the metadata key save_projector writes the backbone identity under
_SETTINGS_KEY = "lora"


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float | None = None  # None: 2 x rank (PEFT scales the update by alpha / rank, so 2)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        object.__setattr__(self, "alpha", float(2 * self.rank if self.alpha is None else self.alpha))
        object.__setattr__(self, "targets", tuple(self.targets))

    def peft_config(self) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), lora_dropout=0.0, bias="none")


def language_model(vlm) -> torch.nn.Module:
    return vlm.model.language_model


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
    # is left as it was); the tuner object is only needed to merge.
    tuner = LoraModel(lm, settings.peft_config(), ADAPTER)
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
    LoRA settings (and ``extra``) in the metadata."""
    settings = attached_settings(vlm)
    if settings is None:
        raise ValueError("the language model carries no LoRA adapter to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(language_model(vlm), adapter_name=ADAPTER)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    metadata = {
        "format": "pt",
        _IDENTITY_KEY: json.dumps(identity, sort_keys=True),
        _SETTINGS_KEY: json.dumps(asdict(settings), sort_keys=True),
    }
    if extra:
        metadata["run"] = json.dumps(extra, sort_keys=True)
    save_file(state, str(path), metadata=metadata)
    return path


def lora_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/lm_lora.safetensors`` for a run folder."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def read_lora(path: str | Path) -> tuple[dict[str, Any], LoraSettings]:
    """``(backbone identity, settings)`` of a saved adapter."""
    path = lora_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _IDENTITY_KEY not in metadata or _SETTINGS_KEY not in metadata:
        raise ValueError(f"{path} has no {_IDENTITY_KEY!r}/{_SETTINGS_KEY!r} metadata; it was not written by save_lora")
    settings = json.loads(metadata[_SETTINGS_KEY])
    return json.loads(metadata[_IDENTITY_KEY]), LoraSettings(settings["rank"], settings["alpha"], tuple(settings["targets"]))


def _load(vlm, path: str | Path, identity: dict[str, Any] | None) -> LoraModel:
    path = lora_file(path)
    trained_on, settings = read_lora(path)
    if identity is not None and trained_on != identity:
        raise ValueError(f"LoRA adapter {path} was trained against another mini-LLaVA backbone: {trained_on} != {identity}")
    tuner = _attach(vlm, settings)
    state = load_file(str(path))
    result = set_peft_model_state_dict(language_model(vlm), state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if _PREFIX in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the language model: missing {missing}, unexpected {result.unexpected_keys}")
    return tuner


def load_lora(vlm, path: str | Path, identity: dict[str, Any] | None = None) -> list[torch.nn.Parameter]:
    """Attach a saved adapter (unmerged, e.g. to continue training); with ``identity``, first
    check it was trained against the same backbone. Returns its float32 parameters."""
    _load(vlm, path, identity)
    return lora_parameters(vlm)


def merge_lora(vlm, path: str | Path, identity: dict[str, Any] | None = None) -> LoraSettings:
    """Apply a saved adapter and merge it into the LM weights: ``vlm`` stays a plain transformers
    model (no PEFT modules, no ``peft_config``), ready for ``save_pretrained`` and every pruner."""
    lm = language_model(vlm)
    trainable = {name: param.requires_grad for name, param in lm.named_parameters()}
    _load(vlm, path, identity).merge_and_unload()  # W += B @ A * alpha / rank, into the base weights' dtype
    for name, param in lm.named_parameters():
        param.requires_grad_(trainable[name])  # as before the adapter (PEFT froze the base while attached)
    if has_lora(vlm) or hasattr(lm, "peft_config"):
        raise RuntimeError("merging left PEFT state in the language model")
    return read_lora(path)[1]


__all__ = [
    "ADAPTER_FILE",
    "DEFAULT_TARGETS",
    "LoraSettings",
    "add_lora",
    "attached_settings",
    "has_lora",
    "load_lora",
    "lora_file",
    "lora_parameters",
    "merge_lora",
    "read_lora",
    "save_lora",
]
