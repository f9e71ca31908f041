"""LoRA on the mini-LLaVA's LM attention during alignment (LLaVA stage 2, but with LoRA), via PEFT.

Projector-only alignment cannot learn to read a small object in a scene (docs/scenes.md): the
frozen LM has no capacity to look for it. Here PEFT injects LoRA layers, in place, into the
attention projections (by default; the MLP's too with more targets) of ``vlm.model.language_model``
only (the vision tower has ``q_proj`` &c. too and stays untouched), so the VLM's forward is
unchanged; a saved adapter can continue wider (``load_lora(widen_to=...)``). The base weights stay frozen in the
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

from minillava.lora import LoraSettings, check_identity, language_model, lora_file, read_lora, write_lora

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
    return LoraSettings(config.r, config.lora_alpha, tuple(config.target_modules))  # LoraSettings orders them


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
    """Inject a fresh LoRA (B = 0, so the VLM computes what it did) into the LM's target linears
    (``settings.targets``); returns its float32 trainable parameters."""
    _attach(vlm, settings)
    return lora_parameters(vlm)


def save_lora(vlm, path: str | Path, identity: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """The attached adapter's weights in float32, with ``identity`` (as ``save_projector``), the
    LoRA settings (and ``extra``) in the metadata (``minillava.lora.write_lora``)."""
    settings = attached_settings(vlm)
    if settings is None:
        raise ValueError("the language model carries no LoRA adapter to save")
    return write_lora(get_peft_model_state_dict(language_model(vlm), adapter_name=ADAPTER), path, identity, settings, extra)


def check_widening(saved: LoraSettings, wider: LoraSettings, path: str | Path = "the adapter") -> None:
    """``wider`` must hold ``saved``: no smaller rank, every saved target kept (a widened adapter
    starts as the saved one, so nothing it learned may be cut away)."""
    lost = [t for t in saved.targets if t not in wider.targets]
    if wider.rank < saved.rank or lost:
        raise ValueError(f"{path} has rank {saved.rank} on {list(saved.targets)}: it cannot continue as rank {wider.rank} "
                         f"on {list(wider.targets)} (a wider adapter must keep its rank and targets{'; lost ' + str(lost) if lost else ''})")
    if wider.rank == saved.rank and set(wider.targets) == set(saved.targets) and wider.alpha != saved.alpha:
        raise ValueError(f"{path} has alpha {saved.alpha}; continuing it unwidened with alpha {wider.alpha} would change its update")


def widened_state(saved_state: dict[str, torch.Tensor], saved: LoraSettings, fresh_state: dict[str, torch.Tensor],
                  wider: LoraSettings) -> dict[str, torch.Tensor]:
    """The saved adapter written into a wider one's freshly initialised weights: the saved A
    fills the first rows of each A, the saved B (times old / new scale) the first columns of
    each B; every new B column, and every new target's B, is PEFT's zero, so the widened adapter
    computes exactly the saved update and the new rank starts learning from there."""
    state = {key: value.clone() for key, value in fresh_state.items()}
    for key, value in saved_state.items():
        if key not in state:
            raise ValueError(f"the wider adapter has no weight {key}")
        if key.endswith("lora_A.weight"):
            state[key][: saved.rank] = value
        else:
            state[key][:, : saved.rank] = value * (saved.scale / wider.scale)
    return state


def load_lora(vlm, path: str | Path, identity: dict[str, Any] | None = None,
              widen_to: LoraSettings | None = None) -> list[torch.nn.Parameter]:
    """Attach a saved adapter (unmerged, e.g. to continue training); with ``identity``, first
    check it was trained against the same backbone. With ``widen_to`` (a higher rank, more
    targets), attach that adapter instead, starting as the saved one (``widened_state``): more
    capacity for a backbone that underfits, without losing what the adapter learned. Returns its
    float32 parameters. To use an adapter rather than train it, merge it: ``minillava.lora.merge_lora``."""
    path = lora_file(path)
    trained_on, saved = read_lora(path)
    check_identity(path, trained_on, identity)
    state = load_file(str(path))
    settings = saved if widen_to is None else widen_to
    if settings != saved:
        check_widening(saved, settings, path)
    _attach(vlm, settings)
    if settings != saved:
        fresh = get_peft_model_state_dict(language_model(vlm), adapter_name=ADAPTER)
        state = widened_state(state, saved, fresh, settings)
    result = set_peft_model_state_dict(language_model(vlm), state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if _PREFIX in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path} does not fit the language model: missing {missing}, unexpected {result.unexpected_keys}")
    return lora_parameters(vlm)


__all__ = [
    "add_lora",
    "attached_settings",
    "check_widening",
    "has_lora",
    "load_lora",
    "lora_parameters",
    "peft_config",
    "save_lora",
    "widened_state",
]
