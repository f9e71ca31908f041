"""Rebuild the text side of a batch so each image contributes K placeholder tokens, not N.

A processor expands every ``<image>`` into N placeholder tokens. After pruning, image ``j``
keeps the K tokens ``keep[j]`` (sorted), so we drop the other N - K placeholders of that image
from ``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (2-D, or M-RoPE's
``[C, B, L]``) and any other per-token tensor (``mm_token_type_ids``), and re-pad rows whose
length changed (rows with different image counts) on the side the batch was padded on.
N and K may differ per image (native-resolution backbones): pass lists then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

IGNORE_INDEX = -100


@dataclass
class TextInputs:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor | None
    position_ids: torch.Tensor | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other per-token tensors, same layout

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids}
        for name in ("attention_mask", "labels", "position_ids"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return {**out, **self.extra}


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


def placeholder_slots(
    input_ids: torch.Tensor, image_token_id: int, tokens_per_image: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, the (rows, cols) of its placeholders when images have different counts.

    Raises ``ValueError`` naming both counts when the text and the images disagree.
    """
    rows, cols = (input_ids == image_token_id).nonzero(as_tuple=True)
    counts = [int(n) for n in tokens_per_image]
    if rows.numel() != sum(counts):
        raise ValueError(
            f"number of images and image tokens do not match: input_ids hold {rows.numel()} image "
            f"tokens (id {image_token_id}) but the {len(counts)} image(s) need {' + '.join(map(str, counts)) or '0'} "
            f"= {sum(counts)} visual tokens"
        )
    return list(zip(rows.split(counts), cols.split(counts)))


def default_position_ids(attention_mask: torch.Tensor | None, shape: torch.Size, for_generation: bool) -> torch.Tensor:
    """The positions the unmodified model would use: ``generate`` counts non-padding tokens,
    a plain forward uses ``arange``."""
    if for_generation and attention_mask is not None:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)
    return torch.arange(shape[-1]).expand(shape).clone()


def prune_placeholders(
    input_ids: torch.Tensor,
    keep: torch.Tensor | Sequence[torch.Tensor],
    image_token_id: int,
    tokens_per_image: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_policy: str = "repack",
    for_generation: bool = False,
    pad_token_id: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
) -> TextInputs:
    """Keep, for image ``j``, only the placeholders at ``keep[j]`` (sorted indices into its N).

    ``position_policy="repack"`` leaves positions to the model (contiguous, as if the image had
    K tokens); ``"original"`` gives kept tokens the positions they had with all N tokens, gaps
    included (``generate`` continues from the last one). ``keep`` is ``[num_images, K]`` with an
    int ``tokens_per_image``, or one index tensor per image with a list of counts.
    """
    extra = dict(extra or {})
    if isinstance(tokens_per_image, int):
        keep = list(keep) if isinstance(keep, torch.Tensor) else keep
        tokens_per_image = [tokens_per_image] * len(keep)
    slots = placeholder_slots(input_ids, image_token_id, tokens_per_image)
    if len(keep) != len(slots):
        raise ValueError(f"{len(keep)} image selections for {len(slots)} images")
    unchanged = all(len(k) == n for k, n in zip(keep, tokens_per_image))
    if unchanged and position_policy == "repack":
        return TextInputs(input_ids, attention_mask, labels, position_ids, extra)

    keep_mask = input_ids != image_token_id
    if attention_mask is not None:
        keep_mask &= attention_mask.bool()  # old padding is dropped; rows are re-padded below
    for (rows, cols), kept in zip(slots, keep):
        keep_mask[rows[kept], cols[kept]] = True
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
        """Move the kept columns of ``t [..., B, L]`` (leading dims: M-RoPE's sections) into place."""
        if t is None:
            return None
        out = torch.full((*t.shape[:-2], t.shape[-2], width), fill, dtype=t.dtype, device=t.device)
        out[..., b_idx, dst_col] = t[..., b_idx, src_col]
        return out

    return TextInputs(
        input_ids=repack(input_ids, pad_token_id),
        attention_mask=repack(attention_mask, 0),
        labels=repack(labels, IGNORE_INDEX),
        position_ids=repack(position_ids, 0),
        extra={name: repack(t, 0) for name, t in extra.items()},
    )
