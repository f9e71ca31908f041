"""Backbone adapters, one file per VLM family. Importing this package registers them all."""

from autoselect.backbones.base import BackboneAdapter, ImagePlan, VisionAttention, pruned_length
from autoselect.backbones.registry import get_adapter, register_backbone, supported_model_types
from autoselect.backbones import gemma3, idefics3, llava, llava_next, qwen3_vl, qwen_vl  # noqa: F401  (registers the adapters)

__all__ = ["BackboneAdapter", "ImagePlan", "VisionAttention", "pruned_length", "get_adapter", "register_backbone", "supported_model_types"]
