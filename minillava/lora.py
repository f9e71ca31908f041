"""The LM LoRA that alignment trains (``lm_lora.safetensors``): its file format, and its merge into
the mini-LLaVA's LM weights without PEFT.

Alignment (``pipelines/align/lora.py``) trains the adapter with PEFT and writes it here with
``write_lora``: PEFT's adapter state dict (``layers.<i>.self_attn.<target>.lora_A.weight`` [rank,
in] and ``...lora_B.weight`` [out, rank], keys relative to ``vlm.model.language_model``) in
float32, with the backbone identity (as ``minillava.aligned.save_projector`` writes it) and the
LoRA settings in the metadata. ``merge_lora`` folds it into the plain model, per target Linear
``W += (alpha / rank) * B @ A`` in float32, cast back to the weight's dtype, so the built backbone
stays a plain ``LlavaForConditionalGeneration`` and nothing that loads it needs PEFT.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "lm_lora.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_GROUPS = {"attention": DEFAULT_TARGETS, "mlp": ("gate_proj", "up_proj", "down_proj")}  # a Llama layer's linears
KNOWN_TARGETS = tuple(name for group in TARGET_GROUPS.values() for name in group)  # in a layer's order
IDENTITY_KEY = "mini_llava"  # metadata key of the backbone identity, in the projector file too
SETTINGS_KEY = "lora"
_A, _B = ".lora_A.weight", ".lora_B.weight"


def canonical_targets(targets) -> tuple[str, ...]:
    """Each target once, in a layer's order (attention, then MLP, then any other name sorted), so
    settings compare equal however the targets were listed."""
    names = set(targets)
    return tuple(n for n in KNOWN_TARGETS if n in names) + tuple(sorted(names - set(KNOWN_TARGETS)))


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float | None = None  # None: 2 x rank (the update is scaled by alpha / rank, so 2)
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        object.__setattr__(self, "alpha", float(2 * self.rank if self.alpha is None else self.alpha))
        object.__setattr__(self, "targets", canonical_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def language_model(vlm) -> torch.nn.Module:
    """The module the adapter's keys are relative to (not the vision tower, which has q_proj too)."""
    return vlm.model.language_model


def lora_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/lm_lora.safetensors`` for a run folder."""
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def write_lora(state: dict[str, torch.Tensor], path: str | Path, identity: dict[str, Any], settings: LoraSettings,
               extra: dict[str, Any] | None = None) -> Path:
    """The adapter's weights in float32, with ``identity``, ``settings`` (and ``extra``) in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    metadata = {
        "format": "pt",
        IDENTITY_KEY: json.dumps(identity, sort_keys=True),
        SETTINGS_KEY: json.dumps(asdict(settings), sort_keys=True),
    }
    if extra:
        metadata["run"] = json.dumps(extra, sort_keys=True)
    save_file(state, str(path), metadata=metadata)
    return path


def read_lora(path: str | Path) -> tuple[dict[str, Any], LoraSettings]:
    """``(backbone identity, settings)`` of a saved adapter (file or run folder)."""
    path = lora_file(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if IDENTITY_KEY not in metadata or SETTINGS_KEY not in metadata:
        raise ValueError(f"{path} has no {IDENTITY_KEY!r}/{SETTINGS_KEY!r} metadata; it was not written by save_lora")
    settings = json.loads(metadata[SETTINGS_KEY])
    return json.loads(metadata[IDENTITY_KEY]), LoraSettings(settings["rank"], settings["alpha"], tuple(settings["targets"]))


def check_identity(path: str | Path, trained_on: dict[str, Any], identity: dict[str, Any] | None) -> None:
    if identity is not None and trained_on != identity:
        raise ValueError(f"LoRA adapter {path} was trained against another mini-LLaVA backbone: {trained_on} != {identity}")


def lora_pairs(state: dict[str, torch.Tensor], settings: LoraSettings, path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (A, B)}`` from an adapter state dict, every key and shape checked."""
    names = {key[: -len(_A)] for key in state if key.endswith(_A)} | {key[: -len(_B)] for key in state if key.endswith(_B)}
    unexpected = sorted(k for k in state if not (k.endswith(_A) or k.endswith(_B)))
    if unexpected:
        raise ValueError(f"{path} holds weights that are not LoRA A/B matrices: {unexpected[:3]}")
    if not names:
        raise ValueError(f"{path} holds no LoRA weights")
    pairs = {}
    for name in sorted(names):
        if name + _A not in state or name + _B not in state:
            raise ValueError(f"{path}: {name} lacks its lora_A or lora_B weight")
        if name.rsplit(".", 1)[-1] not in settings.targets:
            raise ValueError(f"{path}: {name} is not one of the adapter's targets {settings.targets}")
        a, b = state[name + _A], state[name + _B]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != settings.rank or b.shape[1] != settings.rank:
            raise ValueError(f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}, not rank {settings.rank}")
        pairs[name] = (a, b)
    return pairs


def merge_lora(vlm, path: str | Path, identity: dict[str, Any] | None = None) -> LoraSettings:
    """Fold a saved adapter into the LM weights of a plain ``vlm`` (in place, no PEFT): per target
    Linear ``W += (alpha / rank) * B @ A`` in float32, then cast to ``W``'s dtype. With
    ``identity``, first check that the adapter was trained against the same backbone. Everything
    is checked before any weight changes: an adapter that does not fit leaves ``vlm`` as it was."""
    path = lora_file(path)
    trained_on, settings = read_lora(path)
    check_identity(path, trained_on, identity)
    pairs = lora_pairs(load_file(str(path)), settings, path)
    lm = language_model(vlm)
    layers = {}
    for name, (a, b) in pairs.items():
        try:
            layer = lm.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} does not fit the language model: it has no module {name}") from None
        if not isinstance(layer, torch.nn.Linear):
            raise ValueError(f"{path}: {name} is a {type(layer).__name__}, not a plain torch.nn.Linear (an adapter already attached?)")
        if tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
            raise ValueError(f"{path} does not fit the language model: {name} is {tuple(layer.weight.shape)}, "
                             f"the adapter's B @ A is {(b.shape[0], a.shape[1])}")
        layers[name] = layer
    with torch.no_grad():
        for name, (a, b) in pairs.items():
            weight = layers[name].weight
            delta = (b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)) * settings.scale
            weight.copy_((weight.to(torch.float32) + delta).to(weight.dtype))
    return settings


__all__ = [
    "ADAPTER_FILE",
    "DEFAULT_TARGETS",
    "IDENTITY_KEY",
    "KNOWN_TARGETS",
    "LoraSettings",
    "TARGET_GROUPS",
    "canonical_targets",
    "check_identity",
    "language_model",
    "lora_file",
    "lora_pairs",
    "merge_lora",
    "read_lora",
    "write_lora",
]
