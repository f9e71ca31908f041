"""Held-out multiple-choice accuracy from the LM's log-likelihood of every full answer.

For each image the prompt is run once (KV cache kept); every candidate answer, exactly as the
chat template renders an assistant turn (answer + end-of-turn), is then scored as the sum of its
token log-probabilities, and the highest-scoring candidate is the prediction. That measures
what the model would say among the valid answers without depending on free-form phrasing.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from autoselect.data import conversation_segments
from pipelines.align.train import position_ids
from pipelines.corpora import open_image
from pipelines.corpora.common import balanced_take


def balanced_subset(records: Sequence[dict], n: int | None) -> list[dict]:
    """Up to ``n`` records taken round-robin over labels in file order (all when ``n`` is None),
    so a small evaluation keeps the held-out split's class balance."""
    if n is None or n >= len(records):
        return list(records)
    by_label: dict[str, list[dict]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    return balanced_take(by_label, n)


def _prompt(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def answer_token_ids(processor, question: str, answer: str) -> list[int]:
    """The tokens of ``answer`` as an assistant turn (what training put labels on)."""
    messages = [*_prompt(question), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = "".join(piece for piece, is_answer in conversation_segments(processor, messages) if is_answer)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def choice_log_likelihoods(vlm, processor, images: Sequence, question: str, choices: Sequence[str]) -> torch.Tensor:
    """``[len(images), len(choices)]`` summed log-probabilities of each full answer."""
    prompt = processor.apply_chat_template(_prompt(question), add_generation_prompt=True)
    inputs = processor(images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True)
    mask = inputs["attention_mask"]
    positions = position_ids(mask)
    out = vlm(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)
    scores = torch.empty(len(images), len(choices))
    for c, choice in enumerate(choices):
        ids = torch.tensor(answer_token_ids(processor, question, choice)).expand(len(images), -1)
        total = first[:, ids[0, 0]]
        if ids.shape[1] > 1:
            cache = copy.deepcopy(out.past_key_values)  # each candidate continues the same prompt
            steps = torch.arange(1, ids.shape[1])
            rest = vlm(
                input_ids=ids[:, :-1],
                attention_mask=torch.cat([mask, torch.ones_like(ids[:, :-1])], dim=1),
                position_ids=positions[:, -1:] + steps,
                past_key_values=cache,
                use_cache=True,
            ).logits.float().log_softmax(-1)
            total = total + rest.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)
        scores[:, c] = total
    return scores


def choice_accuracy(
    vlm,
    processor,
    corpus_dir: str | Path,
    records: Sequence[dict],
    choices: Sequence[str],
    batch_size: int = 16,
    desc: str = "eval",
) -> dict:
    """Accuracy, chance, per-label accuracy and the prediction counts over ``records`` (each with
    the same question, its answer in ``label``)."""
    questions = {r["conversations"][0]["value"] for r in records}
    if len(questions) != 1:
        raise ValueError(f"records ask {len(questions)} different questions; score one task at a time")
    question = questions.pop().replace("<image>", "").strip()
    unknown = sorted({r["label"] for r in records} - set(choices))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the choices")
    predictions: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        scores = choice_log_likelihoods(vlm, processor, [open_image(corpus_dir, r) for r in chunk], question, choices)
        predictions += [choices[i] for i in scores.argmax(-1).tolist()]
    labels = [r["label"] for r in records]
    correct = [p == y for p, y in zip(predictions, labels)]
    per_label = {
        label: round(sum(c for c, y in zip(correct, labels) if y == label) / labels.count(label), 4)
        for label in choices
        if label in labels
    }
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    return {
        "n": len(records),
        "accuracy": round(sum(correct) / len(records), 4),
        "chance": round(1 / len(choices), 4),
        "majority_label_rate": round(majority, 4),
        "per_label_accuracy": per_label,
        "predicted_counts": dict(Counter(predictions).most_common()),
        "scoring": "argmax over choices of the summed log-probability of the full answer turn",
    }


@torch.no_grad()
def greedy_answers(vlm, processor, corpus_dir: str | Path, records: Sequence[dict], max_new_tokens: int = 12) -> list[dict]:
    """Free-form greedy answers for a few records (a qualitative check next to the scores)."""
    rows = []
    for record in records:
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        prompt = processor.apply_chat_template(_prompt(question), add_generation_prompt=True)
        inputs = processor(images=[open_image(corpus_dir, record)], text=[prompt], return_tensors="pt")
        out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        rows.append({"id": record["id"], "label": record["label"], "generated": text})
    return rows
