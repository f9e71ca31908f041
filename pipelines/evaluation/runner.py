"""Run every method on every task, batch by batch, and keep the raw scores.

Batches are the outer loop, methods the inner one: each batch is encoded once and every method
scores exactly the same rows. Methods are rebuilt per task (``make_methods``), so a seeded
baseline's draws for a task do not depend on which other tasks ran before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from pipelines.evaluation.methods import Method
from pipelines.evaluation.scoring import answer_log_likelihoods, choice_batch, encode_rows
from pipelines.evaluation.stats import stderr_of_mean, stderr_of_ratio
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
    # choice tasks: NLL per token of the true answer turn, far less noisy than 1/0 accuracy
    answer_nll: list[float] = field(default_factory=list)

    def score(self, kind: str) -> float:
        return self.correct / self.n if kind == "choice" else self.nll / self.tokens

    def summary(self, kind: str) -> dict[str, Any]:
        """Score with its standard error over examples (lmms-eval's convention) and the per-example values."""
        out: dict[str, Any] = {"score": self.score(kind), "n": self.n, "per_example": self.per_example}
        if kind == "nll":
            out.update(stderr=stderr_of_ratio(self.per_example, self.per_example_tokens), per_example_tokens=self.per_example_tokens)
        else:
            out.update(stderr=stderr_of_mean(self.per_example), answer_nll=sum(self.answer_nll) / len(self.answer_nll),
                       answer_nll_stderr=stderr_of_mean(self.answer_nll), per_example_answer_nll=self.answer_nll)
        return out


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
    """``{method label: {"score", "stderr", "n", "per_example", ...}}``: accuracy for choice tasks (and
    the true answer's NLL per token, ``answer_nll``), mean NLL per answer token for nll tasks;
    ``per_example`` (1/0 correct, or summed NLL) lets methods be compared pairwise on the same examples.
    A method that cannot run the task (the oracle, without answer boxes) has no entry."""
    methods = [m for m in methods if m.supports(task)]
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
                method.prepare(chunk)
                sums, counts = answer_log_likelihoods(method, batch, repeats, image_token_id)
                tally = tallies[method.label]
                tally.n += len(chunk)
                if task.kind == "choice":
                    sums, counts = sums.view(len(chunk), repeats), counts.view(len(chunk), repeats)
                    hits = (sums.argmax(-1) == truth).tolist()
                    tally.correct += sum(hits)
                    tally.per_example += [float(h) for h in hits]
                    true = truth[:, None]
                    tally.answer_nll += (-sums.gather(1, true) / counts.gather(1, true)).squeeze(1).tolist()
                else:
                    tally.nll -= float(sums.sum())
                    tally.tokens += int(counts.sum())
                    tally.per_example += (-sums).tolist()
                    tally.per_example_tokens += counts.tolist()
                bar.update()
    return {label: t.summary(task.kind) for label, t in tallies.items()}


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
