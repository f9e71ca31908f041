"""Run every method on every task, batch by batch, and keep the raw scores.

Batches are the outer loop, methods the inner one: each batch is encoded once and every method
scores exactly the same rows. Methods are rebuilt per task (``make_methods``), so a seeded
baseline's draws for a task do not depend on which other tasks ran before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from pipelines.evaluation.methods import Method
from pipelines.evaluation.scoring import answer_log_likelihoods, choice_batch, encode_rows
from pipelines.evaluation.tasks import Task


@dataclass
class Tally:
    """Running totals of one method on one task, with one value per example for its standard error."""

    n: int = 0
    correct: int = 0  # choice tasks
    nll: float = 0.0  # nll tasks: summed over answer tokens
    tokens: int = 0
    per_example: list[float] = field(default_factory=list)  # choice: 1/0 correct; nll: summed NLL
    per_example_tokens: list[int] = field(default_factory=list)  # nll tasks: answer tokens

    def score(self, kind: str) -> float:
        return self.correct / self.n if kind == "choice" else self.nll / self.tokens

    def stderr(self, kind: str) -> float | None:
        """Standard error of `score` over examples (None below 2 examples), as lmms-eval reports it:
        the sample standard deviation over sqrt(n) for accuracy; for the token-weighted NLL the
        ratio estimator's (delta method) error, so long answers weigh as they do in the score."""
        n = len(self.per_example)
        if n < 2:
            return None
        if kind == "choice":
            mean = sum(self.per_example) / n
            return math.sqrt(sum((v - mean) ** 2 for v in self.per_example) / (n - 1) / n)
        ratio, mean_tokens = self.score(kind), self.tokens / n
        residuals = [v - ratio * t for v, t in zip(self.per_example, self.per_example_tokens)]
        return math.sqrt(sum(r * r for r in residuals) / (n - 1) / n) / mean_tokens


def to_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point inputs (pixel values) in the model's dtype, everything on its device."""
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def evaluate_task(
    task: Task,
    methods: Sequence[Method],
    processor,
    image_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, dict[str, float | int]]:
    """``{method label: {"score", "stderr", "n", "per_example"}}``: accuracy for choice tasks, mean NLL
    per answer token for nll tasks; ``per_example`` (1/0 correct, or summed NLL) lets methods be
    compared pairwise on the same examples."""
    tallies = {m.label: Tally() for m in methods}
    chunks = [task.examples[i : i + batch_size] for i in range(0, len(task.examples), batch_size)]
    with tqdm(total=len(chunks) * len(methods), desc=task.name, unit="run", leave=False) as bar:
        for chunk in chunks:
            if task.kind == "choice":
                batch, repeats = choice_batch(processor, chunk, task.choices), len(task.choices)
                truth = torch.tensor([task.choices.index(e.answer) for e in chunk])
            else:
                batch, repeats = encode_rows(processor, [(e, e.answer) for e in chunk]), 1
            batch = to_device(batch, device, dtype)
            for method in methods:
                bar.set_postfix_str(method.label)
                sums, counts = answer_log_likelihoods(method, batch, repeats, image_token_id)
                tally = tallies[method.label]
                tally.n += len(chunk)
                if task.kind == "choice":
                    hits = (sums.view(len(chunk), repeats).argmax(-1) == truth).tolist()
                    tally.correct += sum(hits)
                    tally.per_example += [float(h) for h in hits]
                else:
                    tally.nll -= float(sums.sum())
                    tally.tokens += int(counts.sum())
                    tally.per_example += (-sums).tolist()
                    tally.per_example_tokens += counts.tolist()
                bar.update()
    return {
        label: {"score": t.score(task.kind), "stderr": t.stderr(task.kind), "n": t.n, "per_example": t.per_example,
                **({"per_example_tokens": t.per_example_tokens} if task.kind == "nll" else {})}
        for label, t in tallies.items()
    }


def evaluate(
    tasks: Sequence[Task],
    make_methods: Callable[[], list[Method]],
    processor,
    image_token_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """``{task: {method label: {"score", "stderr", "n", "per_example"}}}`` for every task and method."""
    return {
        task.name: evaluate_task(task, make_methods(), processor, image_token_id, batch_size, device, dtype)
        for task in tqdm(tasks, desc="tasks", unit="task")
    }
