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
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from autoselect.config import resolve_budget

if TYPE_CHECKING:
    from autoselect.pruned import Selection


@dataclass
class VisionAttention:
    """One vision-tower pass with what attention-based pruners (VisionZip) read at the feature layer."""

    tokens: torch.Tensor  # [num_images, N, vision_width], exactly what `visual_tokens` returns
    cls_attention: torch.Tensor  # [num_images, N]: softmax attention from the CLS query, mean over heads
    keys: torch.Tensor  # [num_images, N, head_dim]: attention keys, mean over heads


class ImagePlan(NamedTuple):
    """What pruning will do to one image (one view for Idefics3), known before the forward.

    ``n`` counts the image's real visual tokens (not its placeholders: LLaVA-NeXT's row newlines
    are placeholders without a visual token), ``k`` how many of them stay. Every placeholder that
    holds no visual token is kept, so the image shortens the LLM's prompt by exactly ``n - k``.
    """

    image: int  # index in placeholder order (the order of `Selection.per_image`)
    n: int  # N: visual tokens of this image
    k: int  # K: kept

    @property
    def dropped(self) -> int:
        """Prompt tokens this image removes from the LLM's prefill."""
        return self.n - self.k


def pruned_length(prompt_length: int, plan: list[ImagePlan], kept: list[int] | None = None) -> int:
    """Tokens the LLM prefills for a ``prompt_length``-token prompt (placeholders included) once its
    images are pruned as ``plan`` says (or to ``kept`` tokens each, e.g. as measured)."""
    kept = [p.k for p in plan] if kept is None else list(kept)
    if len(kept) != len(plan):
        raise ValueError(f"{len(kept)} kept counts for {len(plan)} images")
    return prompt_length - sum(p.n - k for p, k in zip(plan, kept))


class BackboneAdapter(ABC):
    #: ``config.model_type`` values this adapter serves (the registry key).
    model_types: ClassVar[tuple[str, ...]] = ()
    #: batch keys consumed by the vision side (removed before the language forward).
    image_input_names: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: per-token text-side tensors to prune with ``input_ids`` (e.g. ``mm_token_type_ids``).
    token_input_names: ClassVar[tuple[str, ...]] = ()
    #: True when positions follow the image layout (M-RoPE): ``position_ids`` is then computed on the
    #: full sequence and gathered for the kept tokens, whatever the position policy.
    layout_positions: ClassVar[bool] = False

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
    def visual_tokens(self, **image_inputs: Any) -> torch.Tensor | list[torch.Tensor]:
        """Pre-projector visual tokens ``[num_images, N, vision_width]``, or one ``[N_i, vision_width]``
        per image when N depends on the image (native resolution, AnyRes), in placeholder order."""

    def token_counts(self, **image_inputs: Any) -> list[int]:
        """N of each image (placeholder order) from the processor's image inputs, as `visual_tokens`
        would return them. This default runs the vision tower; adapters override it with the
        arithmetic of their layout (grid sizes, views, merge), which needs no forward pass."""
        with torch.no_grad():
            tokens = self.visual_tokens(**image_inputs)
        return [len(t) for t in tokens]

    def plan(self, inputs: dict[str, Any], budget: int | float) -> list[ImagePlan]:
        """Per image of the processed batch ``inputs`` (the processor's output, before pruning): its N
        and the K that ``budget`` (an int K or a ratio) resolves to, exactly as the pruned forward
        resolves it (`autoselect.config.resolve_budget` on the image's own N). No image: ``[]``.
        A budget that cannot apply (K above an image's N, a `ScoreMass`) raises ``ValueError``."""
        image_inputs = {name: inputs[name] for name in self.image_input_names if inputs.get(name) is not None}
        if image_inputs.get("pixel_values") is None:
            return []
        return [ImagePlan(i, n, resolve_budget(budget, n)) for i, n in enumerate(self.token_counts(**image_inputs))]

    @abstractmethod
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen projector on ``[num_images, K, vision_width]`` -> ``[num_images, K, hidden]``."""

    @abstractmethod
    def encoder_outputs(self, projected: torch.Tensor | list[torch.Tensor]) -> dict[str, Any]:
        """``mm_encoder_outputs`` for the VLM's forward/generate: the embeddings for each image's kept
        placeholders (``[num_images, K, hidden]`` or one ``[K_i, hidden]`` per image)."""

    def place(
        self, image_inputs: dict[str, Any], selection: "Selection", projected: torch.Tensor | list[torch.Tensor]
    ) -> tuple[Any, Any, Any]:
        """Which placeholder slots of each image stay, the embeddings that fill them, and how many
        placeholders each image has. By default visual token i fills placeholder i; backbones with
        placeholders that hold no visual token (LLaVA-NeXT's row newlines) override this."""
        return selection.indices, projected, selection.num_tokens

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_inputs: dict[str, Any], text: dict[str, Any]
    ) -> torch.Tensor:
        """Positions of the full (unpruned) sequence, for ``layout_positions`` backbones."""
        raise NotImplementedError(f"{type(self).__name__} uses the model's default positions")

    def finish_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Last touch on the pruned forward/generate keyword arguments (default: none)."""
        return kwargs

    def vision_attention(self, **image_inputs: Any) -> VisionAttention:
        """Visual tokens plus the vision encoder's CLS attention and keys (optional: for baselines)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose vision-encoder attention")
