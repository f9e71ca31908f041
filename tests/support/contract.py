"""Hugging Face's ``generate`` contract, which every pruner keeps, as one check the tests share."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.generation.streamers import BaseStreamer


class RecordingStreamer(BaseStreamer):
    """Keeps what ``generate`` streams: the prompt first, then each step's ``[batch]`` tokens."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.reshape(len(self.values[0]) if self.values else len(value), -1))

    def end(self) -> None:
        pass


def check_generate_contract(
    model: Any, batch: dict[str, Any], singles: Sequence[dict[str, Any]] = (), max_new_tokens: int = 4, **kwargs: Any
) -> torch.Tensor:
    """Greedy ``model.generate(**batch)`` is the caller's ``input_ids`` (unpruned, padded as passed)
    then ``max_new_tokens`` new tokens: as a tensor, as ``return_dict_in_generate``'s ``.sequences``
    and as a streamer sees them; row ``r``'s new tokens are those of ``singles[r]`` generated alone
    (pass none for a pruner whose draws differ call by call). Returns the sequences."""
    ids, greedy = batch["input_ids"], {"max_new_tokens": max_new_tokens, "do_sample": False, **kwargs}
    out = model.generate(**batch, **greedy)
    assert out.shape == (len(ids), ids.shape[1] + max_new_tokens)
    assert torch.equal(out[:, : ids.shape[1]], ids), "the sequences must start with the caller's input_ids"
    streamer = RecordingStreamer()
    as_dict = model.generate(**batch, **greedy, return_dict_in_generate=True, streamer=streamer)
    assert torch.equal(as_dict.sequences[:, : ids.shape[1]], ids) and as_dict.sequences.shape == out.shape
    assert torch.equal(streamer.values[0], ids), "the streamer must see the caller's prompt"
    assert torch.equal(torch.cat(streamer.values, 1), as_dict.sequences)
    for row, single in enumerate(singles):
        alone = model.generate(**single, **greedy)
        assert torch.equal(out[row, ids.shape[1] :], alone[0, single["input_ids"].shape[1] :]), f"row {row}"
    return out
