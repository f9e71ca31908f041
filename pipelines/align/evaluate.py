"""Held-out multiple-choice accuracy of an aligned mini-LLaVA, scored by the evaluation's scorer.

Every candidate answer, exactly as the chat template renders an assistant turn (answer +
end-of-turn), is scored as the sum of its token log-probabilities under the full VLM
(`pipelines.evaluation.scoring`, each prompt run once and its KV cache shared by the
candidates), and the highest-scoring candidate is the prediction. That measures what the model
would say among the valid answers without depending on free-form phrasing.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from autoselect.backbones import get_adapter
from pipelines.corpora import open_image
from pipelines.evaluation.methods import FullTokens
from pipelines.evaluation.runner import to_device
from pipelines.evaluation.scoring import answer_log_likelihoods, choice_batch, prompt_inputs
from pipelines.evaluation.tasks import Example
from pipelines.preprocessing.corpus import conversation_turns


def choice_accuracy(
    vlm,
    processor,
    corpus_dir: str | Path,
    records: Sequence[dict],
    choices: Sequence[str],
    batch_size: int = 16,
    desc: str = "eval",
) -> dict:
    """Accuracy, chance, per-label accuracy and the prediction counts over ``records`` (each asks
    its first turn's question, its answer in ``label``), full tokens, scored as `evaluate.py` scores."""
    unknown = sorted({r["label"] for r in records} - set(choices))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the choices")
    full, image_token_id = FullTokens(vlm), get_adapter(vlm).image_token_id
    predictions: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc=desc, unit="batch", leave=False):
        chunk = records[start : start + batch_size]
        examples = [record_example(corpus_dir, r) for r in chunk]
        batch = to_device(choice_batch(processor, examples, choices), vlm.device, vlm.dtype)
        sums, _ = answer_log_likelihoods(full, batch, len(choices), image_token_id)
        predictions += [choices[i] for i in sums.view(len(chunk), len(choices)).argmax(-1).tolist()]
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


def record_example(corpus_dir: str | Path, record: dict) -> Example:
    """A packaged-corpora record as an evaluation example: its image, first question, ``label``."""
    return Example(record["id"], open_image(corpus_dir, record), conversation_turns(record["conversations"])[0][0], record["label"])


@torch.no_grad()
def greedy_answers(vlm, processor, corpus_dir: str | Path, records: Sequence[dict], max_new_tokens: int = 12) -> list[dict]:
    """Free-form greedy answers for a few records (a qualitative check next to the scores)."""
    rows = []
    for record in records:
        inputs = prompt_inputs(processor, record_example(corpus_dir, record))
        out = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        rows.append({"id": record["id"], "label": record["label"], "generated": text})
    return rows
