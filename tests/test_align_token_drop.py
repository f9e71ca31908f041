"""Token drop for the alignment loop (pipelines/align/token_drop.py): which subsets are drawn, and
that a dropped batch is the same text with fewer image placeholders, re-packed, and its kept
embeddings those of the kept tokens."""

from __future__ import annotations

import random

import pytest
import torch

from autoselect.data import collate
from autoselect.placeholders import IGNORE_INDEX
from pipelines.align.token_drop import TokenDrop, drop_tokens, sample_subsets, window
from pipelines.align_projector import build_parser

IMAGE = 7


def test_without_drop_every_example_keeps_every_token():
    subsets = sample_subsets(random.Random(0), 5, 64, TokenDrop(prob=0.0))
    assert all(torch.equal(s, torch.arange(64)) for s in subsets)


def test_dropped_subsets_are_sorted_unique_in_range_and_both_kinds_occur():
    drop = TokenDrop(prob=1.0, keep_min=1 / 16, keep_max=1 / 2)
    subsets = sample_subsets(random.Random(3), 400, 256, drop)
    sizes = [len(s) for s in subsets]
    assert all(torch.equal(s, s.unique()) for s in subsets)  # unique() sorts
    assert all(0 <= int(s.min()) and int(s.max()) < 256 for s in subsets)
    assert all(len(s) < 256 for s in subsets) and min(sizes) >= 8 and max(sizes) <= 160  # windows round to h x w
    windows = [s for s in subsets if is_rectangle(s, 16)]
    assert 120 < len(windows) < 280  # about half are grid windows, the rest scattered
    again = sample_subsets(random.Random(3), 400, 256, drop)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))


def test_a_share_of_examples_is_dropped():
    subsets = sample_subsets(random.Random(1), 1000, 64, TokenDrop(prob=0.3))
    dropped = sum(len(s) < 64 for s in subsets)
    assert 230 < dropped < 370


def is_rectangle(subset: torch.Tensor, side: int) -> bool:
    rows, cols = subset // side, subset % side
    height, width = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
    return height * width == len(subset)


def test_a_window_is_a_rectangle_of_about_the_asked_size():
    rng = random.Random(0)
    for count in (1, 5, 16, 40, 128, 256):
        cells = torch.tensor(window(rng, 16, count))
        assert is_rectangle(cells, 16) and len(cells.unique()) == len(cells)
        assert count / 2.5 <= len(cells) <= count * 1.6


@pytest.mark.parametrize("bad", [dict(prob=1.5), dict(keep_min=0.0), dict(keep_min=0.6, keep_max=0.5), dict(keep_max=1.2)])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="token drop"):
        TokenDrop(**bad)


def test_a_grid_that_is_not_square_is_refused():
    with pytest.raises(ValueError, match="token drop needs a square patch grid; 60 visual tokens are not one"):
        sample_subsets(random.Random(0), 2, 60, TokenDrop(prob=1.0))


def test_cli_flags():
    args = build_parser().parse_args(["--token-drop", "0.5", "--token-keep", "0.1,0.4"])
    assert TokenDrop(args.token_drop, *args.token_keep) == TokenDrop(0.5, 0.1, 0.4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--token-keep", "0.1"])
    # the help shows the default as fractions of N, so the flag takes that form too
    assert build_parser().parse_args(["--token-keep", "1/16,1/4"]).token_keep == (0.0625, 0.25)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--token-keep", "1/0,1/4"])


def test_a_dropped_batch_keeps_the_text_and_answers_and_the_kept_embeddings():
    n = 16
    rows = [
        {"input_ids": torch.tensor([1, 2] + [IMAGE] * n + [3, 4, 5]), "labels": torch.tensor([IGNORE_INDEX] * (n + 3) + [4, 5])},
        {"input_ids": torch.tensor([1] + [IMAGE] * n + [3, 9]), "labels": torch.tensor([IGNORE_INDEX] * (n + 2) + [9])},
    ]
    batch = collate(rows, 0, padding_side="left")
    projected = torch.randn(2, n, 3)
    subsets = [torch.tensor([0, 5, 6, 15]), torch.arange(n)]
    pruned, kept = drop_tokens(batch, projected, subsets, IMAGE, pad_token_id=0)
    for row, subset, original in zip(range(2), subsets, rows):
        real = pruned["attention_mask"][row].bool()
        ids, labels = pruned["input_ids"][row][real], pruned["labels"][row][real]
        text = original["input_ids"][original["input_ids"] != IMAGE]
        assert torch.equal(ids[ids != IMAGE], text)
        assert int((ids == IMAGE).sum()) == len(subset)
        assert torch.equal(labels[labels != IGNORE_INDEX], original["labels"][original["labels"] != IGNORE_INDEX])
        assert torch.equal(kept[row], projected[row][subset])
    assert bool(pruned["attention_mask"][:, -1].all())  # still left-padded: every answer ends its row
