"""The scorer learns something: on a task whose answer sits in two patches, a trained scorer
at K = N/4 recovers the answer that a random (untrained) scorer loses."""

import torch

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import answer_accuracy, marker_batches, teach_vlm_markers
from autoselect.training import train


def test_trained_scorer_beats_untrained_at_quarter_budget():
    torch.manual_seed(0)
    vlm, processor = build_tiny_llava(seed=0)
    teach_vlm_markers(vlm, processor, steps=200, seed=1)
    held_out = next(marker_batches(processor, 128, seed=99))
    with torch.no_grad():
        full_loss = float(vlm(**held_out).loss)
    assert answer_accuracy(vlm, held_out) > 0.95, "the tiny VLM must solve the task with all tokens"

    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16, temperature_steps=150)).eval()
    with torch.no_grad():
        untrained_loss = float(model(**held_out).loss)
    untrained_acc = answer_accuracy(model, held_out)

    history = train(model, marker_batches(processor, 16, seed=2), steps=200, lr=1e-3)
    with torch.no_grad():
        trained_loss = float(model(**held_out).loss)
    trained_acc = answer_accuracy(model, held_out)

    assert history[-1]["temperature"] < history[0]["temperature"]
    assert trained_loss < 0.5 * untrained_loss, (full_loss, untrained_loss, trained_loss)
    assert trained_acc > untrained_acc + 0.2, (untrained_acc, trained_acc)
