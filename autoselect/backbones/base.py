"""What AutoSelect needs to know about a VLM family, behind one small interface.

An adapter knows where the visual tokens are (before the projector), how to run the frozen
projector on the tokens that were kept, and how to hand projected tokens back to the VLM's own
forward/generate (transformers 5's ``mm_encoder_outputs`` seam), so the model's own
placeholder check and ``masked_scatter`` do the merge. It wraps one model *instance*; nothing
is patched process-wide, so pruned and unpruned models can live side by side.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class VisionAttention:
    """One vision-tower pass with what attention-based pruners (VisionZip) read at the feature layer."""

    tokens: torch.Tensor  # [num_images, N, vision_width], exactly what `visual_tokens` returns
    cls_attention: torch.Tensor  # [num_images, N]: softmax attention from the CLS query, mean over heads
    keys: torch.Tensor  # [num_images, N, head_dim]: attention keys, mean over heads


class BackboneAdapter(ABC):
    #: ``config.model_type`` values this adapter serves (the registry key).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: batch keys consumed by the vision side (removed before the language forward).
    image_input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)

    def __init__(self, vlm: nn.Module) -> None:
        self.vlm = vlm

    @property
    @abstractmethod
    def vision_width(self) -> int:
        """Width of the visual tokens the scorer sees (before the projector)."""

    @property
    @abstractmethod
    def image_token_id(self) -> int:
        """Placeholder token id the processor repeats once per visual token."""

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.vlm.config, "pad_token_id", None)
        if pad is None:
            pad = getattr(getattr(self.vlm.config, "text_config", None), "pad_token_id", None)
        return int(pad) if pad is not None else 0

    @abstractmethod
    def visual_tokens(self, **image_inputs: Any) -> torch.Tensor:
        """Pre-projector visual tokens ``[num_images, N, vision_width]``."""

    @abstractmethod
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen projector on ``[num_images, K, vision_width]`` -> ``[num_images, K, hidden]``."""

    @abstractmethod
    def encoder_outputs(self, projected: torch.Tensor) -> dict[str, Any]:
        """``mm_encoder_outputs`` for the VLM's forward/generate from projected tokens."""

    def vision_attention(self, **image_inputs: Any) -> VisionAttention:
        """Visual tokens plus the vision encoder's CLS attention and keys (optional: for baselines)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose vision-encoder attention")
