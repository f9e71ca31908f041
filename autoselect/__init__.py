"""AutoSelect: learned visual-token pruning for vision-language models.

A light scorer (and a train-only denoiser) is attached to a frozen VLM and trained with the
VLM's own next-token loss; at inference only the scorer and a hard, order-preserving top-K run.
"""

from autoselect.backbones import ImagePlan, get_adapter, pruned_length, register_backbone, supported_model_types
from autoselect.config import (
    AutoSelectConfig,
    ConfigError,
    InferenceOptions,
    LegacyConfigError,
    OptionDependencyError,
    ScoreMass,
    TrainingOptions,
    UnknownConfigKey,
    resolve_budget,
)
from autoselect.gate import vp_noise_gate
from autoselect.model import AutoSelectModel
from autoselect.pruned import PrunedVLM, Selection
from autoselect.selection import gather_tokens, topk_indices
from autoselect.soft_topk import soft_topk

__all__ = [
    "AutoSelectConfig",
    "AutoSelectModel",
    "ConfigError",
    "ImagePlan",
    "InferenceOptions",
    "LegacyConfigError",
    "OptionDependencyError",
    "PrunedVLM",
    "ScoreMass",
    "Selection",
    "TrainingOptions",
    "UnknownConfigKey",
    "gather_tokens",
    "get_adapter",
    "pruned_length",
    "register_backbone",
    "resolve_budget",
    "soft_topk",
    "supported_model_types",
    "topk_indices",
    "vp_noise_gate",
]
