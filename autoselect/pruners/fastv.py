"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764).

Acts INSIDE the LLM. Layers ``0 .. L-1`` see all N visual tokens per image. The attention that
layer ``L-1`` gives from each row's last token (mean over heads, as in the official code; the paper
text speaks of the attention a token receives; ``rank_columns`` names another column per row, so
that scoring a prompt with its answer ranks at the prompt's end, as generating the answer does)
ranks each image's tokens, and layers ``L ..`` run
on the top K only, in place: their hidden states, rotary positions, mask and KV cache hold K
tokens per image, and kept tokens keep their original positions (as the official in-place
variant does).

It wraps one model instance with hooks that live only for the duration of a call (nothing is
patched process-wide). The ranking attention is rebuilt from layer ``L-1``'s own q/k projections,
so it runs under sdpa or flash attention and never materialises an S x S map. Supported language
models: the Llama-family attention layout (``q_proj``/``k_proj``, optional ``q_norm``/``k_norm``,
rotary ``position_embeddings``), with the default dynamic KV cache.

Outputs: ``forward`` returns logits for the sequence after layer ``L`` (``S - images * (N - K)``
columns; ``last_columns`` maps each back to its input column) and, given ``labels``, the loss on
that sequence. ``generate`` prefills pruned and decodes with the pruned cache; it keeps Hugging
Face's contract: its sequences are the caller's ``input_ids`` (unpruned, padded as passed), then
the new tokens. ``prefill`` and ``continuing`` split that: the prompt once, then any number of
continuations of each row on copies of its pruned cache (scoring several answers to one prompt).
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from autoselect.backbones import BackboneAdapter, get_adapter
from autoselect.config import resolve_budget, validate_budget
from autoselect.placeholders import IGNORE_INDEX, placeholder_positions, prune_placeholders
from autoselect.pruned import Selection
from autoselect.selection import topk_indices


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as Llama applies it."""
    return x * cos + rotate_half(x) * sin


def last_token_attention(
    attention: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    query_columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention from each row's last unmasked token (or its ``query_columns [B]``) to
    every column up to it, mean over heads: ``[B, S]``.

    ``hidden`` is the attention module's input (after the layer norm); this is the row of the
    eager attention map the official code reads, computed from the module's own projections.
    """
    batch, length, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)
    last = key_mask.long().cumsum(-1).argmax(-1)  # first column reaching the final count: the last 1
    if query_columns is not None:
        if query_columns.shape != (batch,) or bool((query_columns > last).any()) or not bool(key_mask[rows, query_columns].all()):
            raise ValueError(f"rank columns {query_columns.tolist()} must be one unmasked column per row, "
                             f"at most its last ({last.tolist()})")
        last = query_columns
    head_dim = attention.head_dim
    query = attention.q_proj(hidden[rows, last]).view(batch, 1, -1, head_dim)
    key = attention.k_proj(hidden).view(batch, length, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3/Gemma3-style per-head norms
        query, key = attention.q_norm(query), attention.k_norm(key)
    cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)  # [B, S, d]
    query = _rotate(query.transpose(1, 2), cos[rows, last][:, None, None], sin[rows, last][:, None, None])
    key = _rotate(key.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
    key = repeat_kv(key, attention.num_key_value_groups)
    logits = (query.float() @ key.float().transpose(-1, -2)).squeeze(2) * attention.scaling  # [B, H, S]
    visible = key_mask.bool() & (torch.arange(length, device=hidden.device) <= last.unsqueeze(-1))
    return logits.masked_fill(~visible.unsqueeze(1), float("-inf")).softmax(-1).mean(1)


class _Pass:
    """One forward/generate call: where the image tokens are, then which columns layer L keeps."""

    def __init__(self, fastv: "FastV", input_ids: torch.Tensor, num_images: int, budget: int | float,
                 rank_columns: torch.Tensor | None = None) -> None:
        self.fastv, self.input_ids, self.rank_columns = fastv, input_ids, rank_columns
        image_token_id = fastv.adapter.image_token_id
        self.num_tokens = int((input_ids == image_token_id).sum()) // max(num_images, 1)
        self.rows, self.cols = placeholder_positions(input_ids, image_token_id, self.num_tokens, num_images)
        self.k = resolve_budget(budget, self.num_tokens)
        self.full_mask: torch.Tensor | None = None  # 2-D mask of the prompt, all columns
        self.selection: Selection | None = None
        self.columns: torch.Tensor | None = None  # [B, S'] input column of each column kept after layer L
        self.kept_mask: torch.Tensor | None = None  # 2-D mask for layers >= L, grows while decoding
        self.prefill = True
        self.step: dict[str, Any] = {}  # mask/rotary for layers >= L, built once per decoder call

    @contextlib.contextmanager
    def hooked(self, decoder: nn.Module, layer: int) -> Iterator["_Pass"]:
        handles = [
            decoder.register_forward_pre_hook(self.on_decoder, with_kwargs=True),
            decoder.layers[layer - 1].self_attn.register_forward_pre_hook(self.on_ranking_attention, with_kwargs=True),
        ]
        handles += [
            block.register_forward_pre_hook(partial(self.on_pruned_layer, first=i == layer), with_kwargs=True)
            for i, block in enumerate(decoder.layers)
            if i >= layer
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def repeat(self, repeats: int) -> None:
        """Each row's state ``repeats`` times in a row, for that many continuations of it."""
        self.columns, self.kept_mask = (t.repeat_interleave(repeats, dim=0) for t in (self.columns, self.kept_mask))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Keep the columns of ``t [1 or B, S, ...]`` that layers >= L see."""
        t = t.expand(self.columns.shape[0], *t.shape[1:])
        return t[torch.arange(t.shape[0], device=t.device).unsqueeze(-1), self.columns]

    def on_decoder(self, _module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        embeds, mask = kwargs["inputs_embeds"], kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise NotImplementedError("FastV needs a 2-D attention mask")
        cache = kwargs.get("past_key_values")
        if cache is not None and type(cache) is not DynamicCache:
            raise NotImplementedError(f"FastV supports the default DynamicCache only, got {type(cache).__name__}")
        length = embeds.shape[1]
        new = mask[:, -length:] if mask is not None else embeds.new_ones(embeds.shape[:2], dtype=torch.long)
        self.prefill = self.columns is None
        if self.prefill:
            if length != self.input_ids.shape[1]:
                raise NotImplementedError("FastV prefills the whole prompt in one call")
            self.full_mask = new.to(self.input_ids.device)
        else:
            self.kept_mask = torch.cat([self.kept_mask, new.to(self.kept_mask)], dim=1)
        self.step = {}

    def on_ranking_attention(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not self.prefill:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attention = last_token_attention(module, hidden, kwargs["position_embeddings"], self.full_mask, self.rank_columns)
        scores = attention[self.rows, self.cols]  # [num_images, N]
        keep = topk_indices(scores, self.k)
        self.selection = Selection(indices=keep, num_tokens=self.num_tokens, scores=scores)
        batch, length = self.input_ids.shape
        kept = prune_placeholders(  # the shared repacking, carrying column numbers as "positions"
            self.input_ids,
            keep,
            image_token_id=self.fastv.adapter.image_token_id,
            tokens_per_image=self.num_tokens,
            attention_mask=self.full_mask,
            position_ids=torch.arange(length, device=self.input_ids.device).expand(batch, length),
            position_policy="original",
        )
        self.columns, self.kept_mask = kept.position_ids, kept.attention_mask

    def on_pruned_layer(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any], first: bool):
        hidden, *rest = args
        if self.prefill and first:
            hidden = self.gather(hidden)
        if not self.step:  # the first pruned layer of this call: as the decoder does once for all layers
            position_embeddings, position_ids = kwargs["position_embeddings"], kwargs.get("position_ids")
            if self.prefill:
                position_embeddings = tuple(self.gather(t) for t in position_embeddings)
                position_ids = self.gather(position_ids) if position_ids is not None else None
            mask = create_causal_mask(
                config=self.fastv.decoder.config,
                inputs_embeds=hidden,
                attention_mask=self.kept_mask,
                past_key_values=kwargs.get("past_key_values"),
                position_ids=position_ids,
                layer_idx=self.fastv.layer,  # layers >= L hold fewer cached tokens than layer 0
            )
            self.step = {
                "attention_mask": mask,
                "position_embeddings": position_embeddings,
                "position_ids": position_ids,
            }
        return (hidden, *rest), {**kwargs, **self.step}


#: families where one ``pixel_values`` row is one image with a fixed run of N placeholders and a
#: plain 1-D position per token, which is what the in-LLM cut assumes
FASTV_MODEL_TYPES = ("llava",)


class FastV(nn.Module):
    """A frozen VLM whose image tokens are cut to K per image after LLM layer ``layer`` (L)."""

    def __init__(
        self, vlm: nn.Module, budget: int | float, layer: int = 2, adapter: BackboneAdapter | None = None
    ) -> None:
        super().__init__()
        validate_budget(budget)
        self.vlm = vlm
        self.adapter = adapter or get_adapter(vlm)
        model_type = getattr(vlm.config, "model_type", None)
        if model_type not in FASTV_MODEL_TYPES:
            raise ValueError(
                f"FastV is implemented for {', '.join(FASTV_MODEL_TYPES)} (one fixed run of N placeholders per image, "
                f"1-D positions); {model_type!r} has views, variable N or multimodal positions"
            )
        num_layers = len(self.decoder.layers)
        if not 1 <= layer < num_layers:
            raise ValueError(f"FastV layer must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM, got {layer}")
        self.layer = layer
        self.default_budget = budget
        self.last_selection: Selection | None = None
        self.last_columns: torch.Tensor | None = None  # [B, S'] input column of each output column
        self._prefilled: _Pass | None = None  # the last `prefill`, which `continuing` extends

    @property
    def decoder(self) -> nn.Module:
        return self.vlm.get_decoder()

    def _pass(self, inputs: dict[str, Any], budget: int | float | None, rank_columns: torch.Tensor | None = None) -> _Pass | None:
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None:
            return None
        if inputs.get("input_ids") is None:
            raise ValueError("FastV needs input_ids holding the image placeholder tokens")
        # LLaVA-style pixel_values: one entry per image.
        return _Pass(self, inputs["input_ids"], len(pixel_values), self.default_budget if budget is None else budget, rank_columns)

    def _finish(self, plan: _Pass) -> None:
        self.last_selection, self.last_columns = plan.selection, plan.columns

    def forward(self, budget: int | float | None = None, rank_columns: torch.Tensor | None = None, **inputs: Any):
        """The VLM with the cut; ``rank_columns [B]``: the column whose attention ranks each row's
        image tokens (default its last token)."""
        labels = inputs.pop("labels", None)
        plan = self._pass(inputs, budget, rank_columns)
        if plan is None:
            return self.vlm(**inputs, labels=labels)
        with plan.hooked(self.decoder, self.layer):
            out = self.vlm(**inputs)
        self._finish(plan)
        if labels is not None:
            kept = plan.gather(labels).masked_fill(plan.kept_mask == 0, IGNORE_INDEX)
            out.loss = self.vlm.loss_function(
                logits=out.logits, labels=kept, vocab_size=self.vlm.config.text_config.vocab_size
            )
        return out

    @torch.no_grad()
    def prefill(self, budget: int | float | None = None, **inputs: Any):
        """The prompt with the cut (ranked at each row's last token, as `generate` prefills) and
        ``use_cache``; its rows are continued inside `continuing`."""
        plan = self._pass(inputs, budget)
        if plan is None:
            raise ValueError("FastV.prefill needs the prompt's pixel_values")
        with plan.hooked(self.decoder, self.layer):
            out = self.vlm(**inputs, use_cache=True)
        self._finish(plan)
        self._prefilled = plan
        return out

    @contextlib.contextmanager
    def continuing(self, repeats: int = 1) -> Iterator[None]:
        """VLM calls inside continue the last `prefill`'s rows, each ``repeats`` times in a row (the
        caller repeats its cache likewise, ``batch_repeat_interleave``), as `generate`'s decoding
        steps do: layers >= L see the kept tokens only."""
        plan, self._prefilled = self._prefilled, None
        if plan is None:
            raise RuntimeError("FastV.continuing needs a prefill first (each prefill is continued once)")
        plan.repeat(repeats)
        with plan.hooked(self.decoder, self.layer):
            yield

    @torch.no_grad()
    def generate(self, budget: int | float | None = None, **inputs: Any) -> torch.Tensor:
        """``vlm.generate`` with FastV inside; the sequences are the caller's ``input_ids``, then the new tokens."""
        plan = self._pass(inputs, budget)
        if plan is None:
            return self.vlm.generate(**inputs)
        with plan.hooked(self.decoder, self.layer):
            out = self.vlm.generate(**inputs)
        self._finish(plan)
        return out
