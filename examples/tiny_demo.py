"""The method alone, in seconds (`make tiny-demo`): train and use an AutoSelect scorer in-process.

Runs on the tiny from-config LLaVA and the synthetic marker task (the answer sits in two of 64
patches): teach the tiny VLM the task, freeze it, attach AutoSelect, train the scorer with the
VLM's next-token loss only, then compare pruned inference at K = N/4 before and after training,
save the scorer, reload it and generate with a budget. No Ray, MLflow or Serve: the main job
with all of them is `make demo` (examples/demo.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import answer_accuracy, marker_batches, marker_image, messages, teach_vlm_markers
from autoselect.training import train


def evaluate(model, batch) -> dict[str, float]:
    with torch.no_grad():
        loss = float(model(**batch).loss)
    return {"loss": round(loss, 4), "accuracy": round(answer_accuracy(model, batch), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/tiny-demo", help="where the trained scorer and summary go")
    parser.add_argument("--budget", type=int, default=16, help="visual tokens kept per image (of 64)")
    parser.add_argument("--steps", type=int, default=200, help="scorer training steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)

    print("[1/5] building the tiny LLaVA from configs and teaching it the marker task (all tokens)")
    vlm, processor = build_tiny_llava(seed=args.seed)
    teach_vlm_markers(vlm, processor, steps=200, seed=args.seed + 1)
    held_out = next(marker_batches(processor, 256, seed=10_000 + args.seed))
    full = evaluate(vlm, held_out)

    print(f"[2/5] attaching AutoSelect (budget K={args.budget}); the VLM is frozen")
    model = AutoSelectModel.attach(vlm, AutoSelectConfig(budget=args.budget, temperature_steps=max(1, args.steps * 3 // 4))).eval()
    model.print_trainable_parameters()
    untrained = evaluate(model, held_out)

    print(f"[3/5] training the scorer for {args.steps} steps (next-token loss only)")
    history = train(
        model, marker_batches(processor, 16, seed=args.seed + 2), steps=args.steps, lr=1e-3,
        on_step=lambda step, m: step % 50 == 0 and print(f"  step {step:4d}  loss {m['loss']:.4f}  tau {m['temperature']:.3f}  alpha_mean {m['alpha_mean']:.3f}"),
    )
    trained = evaluate(model, held_out)

    out = Path(args.out)
    print(f"[4/5] saving the scorer to {out} and reloading it onto the VLM")
    model.save_pretrained(out / "scorer")
    reloaded = AutoSelectModel.from_pretrained(out / "scorer", vlm).eval()

    print("[5/5] generating with the reloaded scorer")
    rng = np.random.default_rng(args.seed)
    image, cells = marker_image(rng, "blue")
    inputs = processor(images=[image], text=[processor.apply_chat_template(messages(), add_generation_prompt=True)], return_tensors="pt")
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    kept = reloaded.last_selection.indices[0].tolist()

    summary = {
        "held_out_examples": int(held_out["input_ids"].shape[0]),
        "visual_tokens": 64,
        "budget": args.budget,
        "full_tokens": full,
        "pruned_untrained_scorer": untrained,
        "pruned_trained_scorer": trained,
        "final_train_loss": round(history[-1]["loss"], 4),
        "example": {"truth": "blue", "answer": answer, "marker_cells": cells, "markers_kept": [c for c in cells if c in kept]},
        "scorer_dir": str(out / "scorer"),
        "seconds": round(time.time() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"\nsummary written to {out / 'summary.json'}; scorer (config.json + model.safetensors) in {out / 'scorer'}")


if __name__ == "__main__":
    main()
