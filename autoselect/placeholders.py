"""Rebuild the text side of a batch so each image contributes K placeholder tokens, not N.

A processor expands every ``<image>`` into N placeholder tokens. After pruning, image ``j``
keeps the K tokens ``keep[j]`` (sorted), so we drop the other N - K placeholders of that image
from ``input_ids``, ``attention_mask``, ``labels`` and ``position_ids``, and re-pad rows whose
length changed (rows with different image counts) on the side the batch was padded on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class TextInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids}
        for name in ("attention_mask", "labels", "position_ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def placeholder_positions(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int, num_images: int):
    """(row, col) of every placeholder, shaped ``[num_images, N]`` in the order features fill them.

    Raises ``ValueError`` naming both counts when the text and the images disagree.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)  # row-major = masked_scatter order
    expected = num_images * tokens_per_image
    if rows.numel() != expected:
        raise ValueError(
            f"number of images and image tokens do not match: input_ids hold {rows.numel()} image "
            f"tokens (id {image_token_id}) but {num_images} image(s) x {tokens_per_image} visual "
            f"tokens = {expected} are needed"
        )
    return rows.view(num_images, tokens_per_image), cols.view(num_images, tokens_per_image)


def default_position_ids(attention_mask: torch.Tensor | None, shape: torch.Size, for_generation: bool) -> torch.Tensor:
    """The positions the unmodified model would use: ``generate`` counts non-padding tokens,
    a plain forward uses ``arange``."""
    if for_generation and attention_mask is not None:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)
    return torch.arange(shape[-1]).expand(shape).clone()


def prune_placeholders(
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    image_token_id: int,
    tokens_per_image: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_policy: str = "repack",
    for_generation: bool = False,
    pad_token_id: int = 0,
) -> TextInputs:
    """Keep, for image ``j``, only the placeholders at ``keep[j]`` (sorted indices into its N).

    ``position_policy="repack"`` leaves positions to the model (contiguous, as if the image had
    K tokens); ``"original"`` gives kept tokens the positions they had with all N tokens, gaps
    included (``generate`` continues from the last one).
    """
    num_images, k = keep.shape
    rows, cols = placeholder_positions(input_ids, image_token_id, tokens_per_image, num_images)
    if k == tokens_per_image and position_policy == "repack":
        return TextInputs(input_ids, attention_mask, labels, position_ids)

    keep_mask = input_ids != image_token_id
    if attention_mask is not None:
        keep_mask &= attention_mask.bool()  # old padding is dropped; rows are re-padded below
    keep_mask[rows.gather(1, keep), cols.gather(1, keep)] = True
    if position_policy == "original" and position_ids is None:
        position_ids = default_position_ids(attention_mask, input_ids.shape, for_generation).to(input_ids.device)

    new_len = keep_mask.sum(-1)
    width = int(new_len.max())
    if attention_mask is None and bool((new_len != width).any()):
        attention_mask = torch.ones_like(input_ids)  # rows now differ in length: padding must be masked
    left = attention_mask is not None and bool((attention_mask[:, 0] == 0).any())
    dest = keep_mask.long().cumsum(-1) - 1
    if left:
        dest = dest + (width - new_len).unsqueeze(-1)
    b_idx, src_col = keep_mask.nonzero(as_tuple=True)
    dst_col = dest[b_idx, src_col]

    def repack(t: torch.Tensor | None, fill: int) -> torch.Tensor | None:
        if t is None:
            return None
        out = torch.full((t.shape[0], width), fill, dtype=t.dtype, device=t.device)
        out[b_idx, dst_col] = t[b_idx, src_col]
        return out

    return TextInputs(
        input_ids=repack(input_ids, pad_token_id),
        attention_mask=repack(attention_mask, 0),
        labels=repack(labels, IGNORE_INDEX),
        position_ids=repack(position_ids, 0) if position_ids is not None and position_ids.dim() == 2 else position_ids,
    )
