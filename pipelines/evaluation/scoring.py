"""Answer log-likelihoods under any method, exact whatever columns the method dropped.

Every row is encoded as training encodes it (`encode_example`: the chat template's full
assistant turn gets labels, answer + end-of-turn), right-padded, without ``position_ids``, so
every method (the full VLM, a re-packed `PrunedVLM`, FastV) sees each row exactly as it would
alone. The logits a method returns cover ITS sequence, which is shorter than the input when
visual tokens were dropped before the LLM (``images * (N - K)`` columns) or inside it (FastV,
after layer L). `output_columns` maps every output column back to its input column with the
library's own re-packing (`prune_placeholders`, as FastV computes ``last_columns``), so each
answer token is scored by the logit of the column just before it in the pruned sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from autoselect.data import collate, encode_example
from autoselect.placeholders import IGNORE_INDEX, prune_placeholders
from autoselect.pruned import Selection
from pipelines.evaluation.methods import Method
from pipelines.evaluation.tasks import Example, Task, TaskContext, load_tasks
from pipelines.preprocessing.samples import chat_messages

SCORING = {
    "choice": "accuracy: argmax over the choices of the summed log-probability of the full answer turn "
    "(answer + end of turn, as the chat template renders it); pre-LLM pruners choose once per image, "
    "FastV ranks by the attention of the prompt's last token (once per question, as when it generates)",
    "nll": "mean negative log-likelihood per answer token (nats), token-weighted over the task",
}


def encode_rows(processor, rows: Sequence[tuple[Example, str]]) -> dict[str, torch.Tensor]:
    """One right-padded batch row per ``(example, answer)``: its image, question and that answer."""
    encoded = [encode_example(processor, chat_messages([(e.question, answer)]), [e.image]) for e, answer in rows]
    return collate(encoded, processor.tokenizer.pad_token_id, padding_side="right")


def choice_batch(processor, examples: Sequence[Example], choices: Sequence[str]) -> dict[str, torch.Tensor]:
    """``len(examples) * len(choices)`` rows, example-major: row ``i * C + c`` answers ``choices[c]``."""
    return encode_rows(processor, [(e, c) for e in examples for c in choices])


def prompt_inputs(processor, example: Example) -> dict[str, torch.Tensor]:
    """The prompt alone (with the generation prompt), as a user would send it."""
    messages = chat_messages([(example.question, "")])[:1]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(images=[example.image], text=[text], return_tensors="pt"))


def probe_prompt(processor) -> dict[str, torch.Tensor]:
    """A prompt with one blank image: what the processor makes of any image (side, visual tokens)."""
    return prompt_inputs(processor, Example("probe", Image.new("RGB", (64, 64)), "?", ""))


def task_context(vlm, probe: dict[str, torch.Tensor], corpora_dir: Path, seed: int = 0, limit: int | None = None,
                 split: str = "val") -> TaskContext:
    """The `TaskContext` of this backbone: the image side its processor produces (from a
    `probe_prompt`), its patch size; ``split`` is the held-out half (val: choose, test: report)."""
    return TaskContext(image_size=int(probe["pixel_values"].shape[-1]), patch_size=int(vlm.config.vision_config.patch_size),
                       corpora_dir=corpora_dir, seed=seed, limit=limit, split=split)


def heldout_task(vlm, processor, name: str, corpora_dir: Path, limit: int | None, seed: int = 0, split: str = "val") -> Task:
    """One held-out task for this backbone (``split``: val by default, where recipes are chosen);
    ValueError naming why when its data is absent."""
    tasks, skipped = load_tasks([name], task_context(vlm, probe_prompt(processor), corpora_dir, seed, limit, split))
    if not tasks:
        raise ValueError(f"task {name!r} is not available: {skipped[name]}")
    return tasks[0]


def output_columns(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, selection: Selection | None, image_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(columns, valid)`` ``[rows, S']``: the input column behind every column of the pruned
    sequence, and which of them are real tokens (not re-padding)."""
    rows, length = input_ids.shape
    arange = torch.arange(length, device=input_ids.device).expand(rows, length)
    if selection is None:
        return arange, attention_mask.bool()
    kept = prune_placeholders(  # column numbers ride along as "original" positions
        input_ids,
        selection.indices,
        image_token_id=image_token_id,
        tokens_per_image=selection.num_tokens,
        attention_mask=attention_mask,
        position_ids=arange,
        position_policy="original",
    )
    return kept.position_ids, kept.attention_mask.bool()


def shared_prompt_length(batch: dict[str, torch.Tensor], repeats: int) -> int | None:
    """The columns before the answers when every row's answer starts at the same column and the
    rows of each group of ``repeats`` agree on them (their prompt); None otherwise."""
    labels, ids = batch["labels"], batch["input_ids"]
    if repeats < 2:
        return None
    first = (labels != IGNORE_INDEX).float().argmax(-1)
    prefix = int(first[0])
    if prefix == 0 or not bool((first == prefix).all()):
        return None
    groups = ids[:, :prefix].view(-1, repeats, prefix)
    return prefix if bool((groups == groups[:, :1]).all()) and bool(batch["attention_mask"][:, :prefix].all()) else None


def prompt_ends(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last column before its answer ``[rows]`` (its last token if it has no answer)."""
    labelled = labels != IGNORE_INDEX
    last = attention_mask.long().cumsum(-1).argmax(-1)
    return torch.where(labelled.any(-1), labelled.float().argmax(-1) - 1, last)


def tail_length(labels: torch.Tensor) -> int:
    """``logits_to_keep``: the columns from the one predicting the earliest answer token to the end.

    Answers follow the image, so every row loses its dropped visual tokens before them and the
    tail is the same length in the pruned sequence (checked in `answer_log_likelihoods`).
    """
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled) == 0:
        raise ValueError("the batch has no answer tokens to score")
    return labels.shape[1] - int(labelled[0]) + 1


@torch.no_grad()
def answer_log_likelihoods(
    method: Method, batch: dict[str, torch.Tensor], repeats: int, image_token_id: int, share_prompts: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled answer tokens ``[rows]`` (float64)
    and how many there are ``[rows]``."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = method.forward(inputs, repeats, tail_length(labels), shared_prompt_length(batch, repeats) if share_prompts else None,
                         prompt_ends(labels, batch["attention_mask"]))
    columns, valid = output_columns(batch["input_ids"], batch["attention_mask"], out.selection, image_token_id)
    if out.columns is not None and not torch.equal(columns, out.columns):
        raise RuntimeError(f"{method.label}: its reported output columns differ from the re-packing of its selection")
    window = out.logits.shape[1]
    if window > columns.shape[1]:
        raise RuntimeError(f"{method.label}: {window} logit columns for a {columns.shape[1]}-column sequence")
    target = labels.gather(1, columns).masked_fill(~valid, IGNORE_INDEX)[:, -window:][:, 1:]
    scored = target != IGNORE_INDEX
    expected = (labels != IGNORE_INDEX).sum(-1)
    if not torch.equal(scored.sum(-1), expected):
        raise RuntimeError(f"{method.label}: {int(expected.sum() - scored.sum())} answer tokens fall outside the scored logits")
    logits = out.logits[:, :-1][scored].float()
    picked = logits.log_softmax(-1).gather(-1, target[scored].unsqueeze(-1)).squeeze(-1)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=picked.device)
    sums.index_add_(0, scored.nonzero()[:, 0], picked.double())
    return sums.cpu(), expected.cpu()
