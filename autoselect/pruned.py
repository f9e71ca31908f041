"""`PrunedVLM`: run a frozen VLM on K of its N visual tokens per image, whoever chose them.

The inference path shared by AutoSelect and the training-free baselines that act before the
LLM: visual tokens -> ``choose`` (indices, sorted) -> projector on the kept tokens -> the VLM's
own forward/generate with ``input_ids``/``attention_mask``/``labels``/``position_ids`` rebuilt
so each image contributes K tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoselect.backbones import BackboneAdapter, get_adapter
from autoselect.config import POSITION_POLICIES, resolve_budget, validate_budget
from autoselect.placeholders import prune_placeholders
from autoselect.selection import gather_tokens


@dataclass
class Selection:
    """What was kept for a batch of images (exposed for evaluation, serving and plots)."""

    indices: torch.Tensor  # [num_images, K], sorted
    num_tokens: int  # N
    scores: torch.Tensor | None = None  # [num_images, N] when the selector scores tokens
    # [num_images, K, D] pre-projector tokens to send instead of ``tokens[indices]``, for selectors
    # that make new tokens (VisionZip's merged contextual tokens); ``indices`` then names the
    # placeholder slot (and, with position_policy="original", the position) each one takes.
    tokens: torch.Tensor | None = None

    @property
    def budget(self) -> int:
        return int(self.indices.shape[-1])

    def kept_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The ``[num_images, K, D]`` tokens that reach the projector, from all ``tokens [num_images, N, D]``."""
        if self.tokens is None:
            return gather_tokens(tokens, self.indices)
        if self.tokens.shape[:2] != self.indices.shape:
            raise ValueError(
                f"Selection.tokens has shape {tuple(self.tokens.shape)}, indices {tuple(self.indices.shape)}"
            )
        return self.tokens


class PrunedVLM(nn.Module):
    """A frozen VLM whose visual tokens are pruned by ``choose`` before the LLM."""

    def __init__(
        self,
        vlm: nn.Module,
        budget: int | float,
        adapter: BackboneAdapter | None = None,
        position_policy: str = "repack",
    ) -> None:
        super().__init__()
        if position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy must be one of {POSITION_POLICIES}, got {position_policy!r}")
        validate_budget(budget)
        self.vlm = vlm
        self.adapter = adapter or get_adapter(vlm)
        self._budget = budget
        self._position_policy = position_policy
        self.last_selection: Selection | None = None

    @property
    def default_budget(self) -> int | float:
        """Budget used when a call passes none."""
        return self._budget

    @property
    def position_policy(self) -> str:
        return self._position_policy

    # ---- to override --------------------------------------------------------------------
    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        """Pick ``k`` of the ``tokens [num_images, N, D]`` per image; indices sorted.

        Set ``Selection.tokens`` to send other (e.g. merged) tokens in the ``k`` kept slots.
        """
        raise NotImplementedError

    # ---- shared path --------------------------------------------------------------------
    def split_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Separate the vision-side inputs (pixel values, ...) from the text-side ones."""
        image_inputs = {k: inputs.pop(k) for k in self.adapter.image_input_names if k in inputs}
        if image_inputs.get("pixel_values") is None:
            return {}, inputs
        return image_inputs, inputs

    def visual_tokens(self, **image_inputs: Any) -> torch.Tensor:
        with torch.no_grad():  # the vision encoder is frozen: keep no activations for backward
            return self.adapter.visual_tokens(**image_inputs)

    def resolve_budget(self, num_tokens: int, budget: int | float | None = None) -> int:
        return resolve_budget(self.default_budget if budget is None else budget, num_tokens)

    def select(self, budget: int | float | None = None, **image_inputs: Any) -> tuple[Selection, torch.Tensor]:
        """The selection and the kept (pre-projector) tokens ``[num_images, K, D]``."""
        tokens = self.visual_tokens(**image_inputs)
        k = self.resolve_budget(tokens.shape[1], budget)
        with torch.no_grad():
            selection = self.choose(tokens, k, image_inputs)
        return selection, selection.kept_tokens(tokens)

    def pruned_inputs(
        self, image_inputs: dict[str, Any], text: dict[str, Any], budget: int | float | None, for_generation: bool
    ) -> dict[str, Any]:
        """Keyword arguments for the VLM's forward/generate with K tokens per image."""
        input_ids = text.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids holding the image placeholder tokens")
        selection, kept = self.select(budget, **image_inputs)
        self.last_selection = selection
        rebuilt = prune_placeholders(
            input_ids,
            selection.indices,
            image_token_id=self.adapter.image_token_id,
            tokens_per_image=selection.num_tokens,
            attention_mask=text.pop("attention_mask", None),
            labels=text.pop("labels", None),
            position_ids=text.pop("position_ids", None),
            position_policy=self.position_policy,
            for_generation=for_generation,
            pad_token_id=self.adapter.pad_token_id,
        )
        projected = self.adapter.project(kept)
        return {**text, **rebuilt.as_kwargs(), "mm_encoder_outputs": self.adapter.encoder_outputs(projected)}

    def forward(self, budget: int | float | None = None, **inputs: Any):
        image_inputs, text = self.split_inputs(dict(inputs))
        if not image_inputs:
            return self.vlm(**text)
        return self.vlm(**self.pruned_inputs(image_inputs, text, budget, for_generation=False))

    @torch.no_grad()
    def generate(self, budget: int | float | None = None, **inputs: Any) -> torch.Tensor:
        """``vlm.generate`` with each image pruned to ``budget`` tokens (default: ours).

        The returned sequences start with the rebuilt prompt (K placeholders per image).
        """
        image_inputs, text = self.split_inputs(dict(inputs))
        if not image_inputs:
            return self.vlm.generate(**text)
        return self.vlm.generate(**self.pruned_inputs(image_inputs, text, budget, for_generation=True))
