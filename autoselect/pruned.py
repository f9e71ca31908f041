"""`PrunedVLM`: run a frozen VLM on K of its N visual tokens per image, whoever chose them.

The inference path shared by AutoSelect and the training-free baselines that act before the
LLM: visual tokens -> ``choose`` (indices, sorted) -> projector on the kept tokens -> the VLM's
own forward/generate with ``input_ids``/``attention_mask``/``labels``/``position_ids`` rebuilt
so each image contributes K tokens.

Backbones with a fixed N per image (LLaVA-1.5, Gemma 3) run the selector on the whole batch at
once. Native-resolution backbones (Qwen-VL, LLaVA-NeXT's AnyRes) have N_i tokens for image i:
the adapter returns one tensor per image, the budget resolves per image (a ratio keeps the same
share of every image), and the selector runs image by image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer

from autoselect.backbones import BackboneAdapter, ImagePlan, get_adapter
from autoselect.config import POSITION_POLICIES, resolve_budget, validate_budget
from autoselect.placeholders import prune_placeholders
from autoselect.selection import gather_tokens


Tokens = torch.Tensor | list[torch.Tensor]  # [num_images, N, D], or [N_i, D] per image


@dataclass
class Selection:
    """What was kept for a batch of images (exposed for evaluation, serving and plots).

    For native-resolution backbones ``indices``, ``num_tokens``, ``scores`` and ``tokens`` are
    lists with one entry per image (``[K_i]``, ``N_i``, ``[N_i]``, ``[K_i, D]``).
    """

    indices: torch.Tensor  # [num_images, K], sorted
    num_tokens: int  # N
    scores: torch.Tensor | None = None  # [num_images, N] when the selector scores tokens
    # [num_images, K, D] pre-projector tokens to send instead of ``tokens[indices]``, for selectors
    # that make new tokens (VisionZip's merged contextual tokens); ``indices`` then names the
    # placeholder slot (and, with position_policy="original", the position) each one takes.
    tokens: torch.Tensor | None = None

    @property
    def ragged(self) -> bool:
        return isinstance(self.indices, list)

    @property
    def budget(self) -> int:
        """K (the largest K of the batch for native-resolution backbones)."""
        return max(len(i) for i in self.indices) if self.ragged else int(self.indices.shape[-1])

    def per_image(self) -> list[torch.Tensor]:
        """The kept indices of each image, ``[K_i]``."""
        return list(self.indices)

    def counts(self) -> list[int]:
        """N of each image."""
        return list(self.num_tokens) if self.ragged else [self.num_tokens] * len(self.indices)

    @classmethod
    def concat(cls, selections: list["Selection"]) -> "Selection":
        """One ragged selection from one single-image selection per image."""
        def gather(name: str) -> list | None:
            values = [getattr(s, name) for s in selections]
            return None if all(v is None for v in values) else [None if v is None else v[0] for v in values]

        return cls(
            indices=[s.indices[0] for s in selections],
            num_tokens=[s.num_tokens for s in selections],
            scores=gather("scores"),
            tokens=gather("tokens"),
        )

    def kept_tokens(self, tokens: Tokens) -> Tokens:
        """The ``[num_images, K, D]`` tokens that reach the projector, from all ``tokens [num_images, N, D]``."""
        if self.ragged:
            if self.tokens is not None:
                return list(self.tokens)
            return [t[i] for t, i in zip(tokens, self.indices)]
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

    def visual_tokens(self, **image_inputs: Any) -> Tokens:
        """``[num_images, N, D]``; one ``[N_i, D]`` per image when N differs between images."""
        with torch.no_grad():  # the vision encoder is frozen: keep no activations for backward
            tokens = self.adapter.visual_tokens(**image_inputs)
        if isinstance(tokens, list) and len({len(t) for t in tokens}) == 1:
            return torch.stack(tokens)  # same N everywhere: batch the selector
        return tokens

    def resolve_budget(self, num_tokens: int, budget: int | float | None = None) -> int:
        return resolve_budget(self.default_budget if budget is None else budget, num_tokens)

    def plan(self, inputs: dict[str, Any], budget: int | float | None = None) -> list[ImagePlan]:
        """Per image of the processed ``inputs`` (the processor's output, before pruning): its N
        visual tokens and the K that ``budget`` (default: ours) keeps, as the forward will resolve
        them, answered by the backbone adapter without running the model. Serving and evaluation
        size prompts and group batches with it; `autoselect.backbones.pruned_length` turns it into
        the length the LLM prefills."""
        return self.adapter.plan(inputs, self.default_budget if budget is None else budget)

    def select(self, budget: int | float | None = None, **image_inputs: Any) -> tuple[Selection, Tokens]:
        """The selection and the kept (pre-projector) tokens ``[num_images, K, D]`` (or ``[K_i, D]`` each)."""
        tokens = self.visual_tokens(**image_inputs)
        with torch.no_grad():
            if isinstance(tokens, list):
                # image by image; the selector sees only the tokens (input-dependent ones need fixed N)
                selection = Selection.concat(
                    [self.choose(t[None], self.resolve_budget(len(t), budget), {}) for t in tokens]
                )
            else:
                selection = self.choose(tokens, self.resolve_budget(tokens.shape[1], budget), image_inputs)
        return selection, selection.kept_tokens(tokens)

    def project(self, tokens: Tokens) -> list[torch.Tensor] | torch.Tensor:
        """The frozen projector on kept tokens, one call for the whole batch."""
        if not isinstance(tokens, list):
            return self.adapter.project(tokens)
        sizes = [len(t) for t in tokens]
        return list(self.adapter.project(torch.cat(tokens)[None])[0].split(sizes))

    def language_inputs(
        self, text: dict[str, Any], image_inputs: dict[str, Any], selection: Selection, projected, for_generation: bool
    ) -> dict[str, Any]:
        """The VLM's forward/generate keyword arguments with ``selection`` kept of each image."""
        input_ids = text.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("pruning needs input_ids holding the image placeholder tokens")
        slots, embeddings, placeholders = self.adapter.place(image_inputs, selection, projected)
        position_ids = text.pop("position_ids", None)
        policy = self.position_policy
        if position_ids is None and self.adapter.layout_positions:
            # positions follow the image layout (M-RoPE): computed on the full sequence, then gathered
            position_ids = self.adapter.position_ids(input_ids, text.get("attention_mask"), image_inputs, text)
            policy = "original"
        rebuilt = prune_placeholders(
            input_ids,
            slots,
            image_token_id=self.adapter.image_token_id,
            tokens_per_image=placeholders,
            attention_mask=text.pop("attention_mask", None),
            labels=text.pop("labels", None),
            position_ids=position_ids,
            position_policy=policy,
            for_generation=for_generation,
            pad_token_id=self.adapter.pad_token_id,
            extra={name: text.pop(name) for name in self.adapter.token_input_names if name in text},
        )
        kwargs = {**text, **rebuilt.as_kwargs(), "mm_encoder_outputs": self.adapter.encoder_outputs(embeddings)}
        return self.adapter.finish_inputs(kwargs)

    def pruned_inputs(
        self, image_inputs: dict[str, Any], text: dict[str, Any], budget: int | float | None, for_generation: bool
    ) -> dict[str, Any]:
        """Keyword arguments for the VLM's forward/generate with K tokens per image."""
        if text.get("input_ids") is None:
            raise ValueError("pruning needs input_ids holding the image placeholder tokens")
        selection, kept = self.select(budget, **image_inputs)
        self.last_selection = selection
        return self.language_inputs(text, image_inputs, selection, self.project(kept), for_generation)

    def forward(self, budget: int | float | None = None, **inputs: Any):
        image_inputs, text = self.split_inputs(dict(inputs))
        if not image_inputs:
            return self.vlm(**text)
        return self.vlm(**self.pruned_inputs(image_inputs, text, budget, for_generation=False))

    @torch.no_grad()
    def generate(self, budget: int | float | None = None, **inputs: Any):
        """``vlm.generate`` with each image pruned to ``budget`` tokens (default: ours).

        Hugging Face's contract: the sequences (or ``.sequences`` with ``return_dict_in_generate``)
        are the caller's ``input_ids``, unpruned and padded as passed, then the new tokens, so
        ``out[:, input_ids.shape[1]:]`` is the answer; a ``streamer`` is handed that prompt too. The
        LLM itself ran on K placeholders per image: a returned cache, ``attentions`` or
        ``hidden_states`` cover that shorter prompt.
        """
        image_inputs, text = self.split_inputs(dict(inputs))
        if not image_inputs:
            return self.vlm.generate(**text)
        kwargs = self.pruned_inputs(image_inputs, text, budget, for_generation=True)
        if kwargs.get("streamer") is not None:
            kwargs["streamer"] = _CallerPrompt(kwargs["streamer"], inputs["input_ids"])
        return with_prompt(self.vlm.generate(**kwargs), inputs["input_ids"], kwargs["input_ids"].shape[1])


def with_prompt(out, input_ids: torch.Tensor, prompt_length: int):
    """``generate``'s output ``out`` on a ``prompt_length``-column prompt, with the caller's
    ``input_ids`` in place of that prompt (repeated per returned sequence, as generate expands them)."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    prompt = input_ids.to(sequences.device).repeat_interleave(len(sequences) // len(input_ids), dim=0)
    sequences = torch.cat([prompt, sequences[:, prompt_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return sequences
    out.sequences = sequences
    return out


class _CallerPrompt(BaseStreamer):
    """A streamer's first ``put`` (the prompt) gets the caller's ``input_ids``, not the pruned ones."""

    def __init__(self, streamer: BaseStreamer, input_ids: torch.Tensor) -> None:
        self.streamer, self.prompt = streamer, input_ids

    def put(self, value: torch.Tensor) -> None:
        self.streamer.put(value if self.prompt is None else self.prompt.cpu())
        self.prompt = None

    def end(self) -> None:
        self.streamer.end()
