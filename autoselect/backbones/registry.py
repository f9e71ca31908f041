"""Backbone registry keyed by ``config.model_type`` (as PEFT keys its target-module table)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from autoselect.backbones.base import BackboneAdapter

_REGISTRY: dict[str, type["BackboneAdapter"]] = {}


def register_backbone(cls: type["BackboneAdapter"]) -> type["BackboneAdapter"]:
    """Class decorator: make an adapter available for each of its ``model_types``."""
    for model_type in cls.model_types:
        if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
            raise ValueError(f"model_type {model_type!r} already registered by {_REGISTRY[model_type].__name__}")
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(vlm: nn.Module) -> "BackboneAdapter":
    """The adapter for ``vlm``, or a ``ValueError`` listing what is supported."""
    config = getattr(vlm, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(
            f"AutoSelect has no backbone adapter for {type(vlm).__name__} (model_type={model_type!r}); "
            f"supported model types: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[model_type](vlm)
