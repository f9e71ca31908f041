"""lmms-eval model plug-in: run any lmms-eval benchmark on a VLM pruned by AutoSelect (or a baseline).

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``), so an installed
project is found by name; nothing is copied into lmms-eval:

    lmms-eval eval --model autoselect \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,autoselect=models:/autoselect-llava@champion,budget=64 \\
        --tasks mme,gqa --batch_size 1

``model_args``: ``pretrained`` (HF folder/id or ``autoselect-testing/tiny-<family>``), ``autoselect``
(a ``save_pretrained`` folder or ``models:/name@alias``; needed for ``pruner=autoselect``), ``pruner``
(``autoselect`` | ``none`` | a baseline name), ``budget`` (int K or ratio; default: the scorer's),
``dtype`` (``auto``), ``device`` (``auto``: CUDA when present), ``max_new_tokens`` (default 64).
One process drives one device; run several with lmms-eval's accelerate launcher for data parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from autoselect.data import encode_example
from autoselect.placeholders import IGNORE_INDEX
from mlops.backbone import load_autoselect, load_vlm_and_processor
from pipelines.evaluation.report import parse_budget


def manifest():
    """The ``lmms_eval.models`` entry point: the model name and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="autoselect", simple_class_path="pipelines.evaluation.lmms_eval_plugin.AutoSelectLMMS",
                         aliases=("autoselect_pruned",))


class AutoSelectLMMS(lmms):
    """A frozen VLM behind AutoSelect or a training-free pruner, answering lmms-eval requests."""

    def __init__(self, pretrained: str, autoselect: str | None = None, pruner: str = "autoselect", budget: str | None = None,
                 dtype: str = "auto", device: str = "auto", max_new_tokens: int = 64, batch_size: int = 1, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for autoselect: {sorted(kwargs)}")
        self._device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
        self.vlm, self.processor = load_vlm_and_processor(pretrained, dtype, self._device)
        self.processor.tokenizer.padding_side = "left"
        # lmms-eval may already have turned "8" into 8; the evaluation CLI's parser takes K, 0.25 or 1/9
        self.budget = None if budget in (None, "") else parse_budget(str(budget))
        self.max_new_tokens = int(max_new_tokens)
        if pruner == "autoselect":
            if not autoselect:
                raise ValueError("pruner=autoselect needs autoselect=<scorer folder or models:/name@alias>")
            self.model, _ = load_autoselect(autoselect, self.vlm)
        elif pruner == "none":
            self.model = self.vlm
        else:
            from autoselect.pruners import build_pruner

            if self.budget is None:
                raise ValueError(f"pruner={pruner} needs a budget")
            self.model = build_pruner(pruner, self.vlm, self.budget)
        self.pruner = pruner

    # ---- helpers ------------------------------------------------------------------------------
    def _images(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args[:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [v.convert("RGB") for v in visuals]

    def _messages(self, context: str, images: list, answer: str | None = None) -> list[dict]:
        text = context.replace("<image>", "").strip()
        turn = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": text}]}]
        if answer is not None:
            turn.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return turn

    def _kwargs(self) -> dict:
        return {} if self.pruner == "none" or self.budget is None else {"budget": self.budget}

    def _inputs(self, text: str, images: list) -> dict:
        inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        return {k: v.to(self._device) for k, v in inputs.items()}

    # ---- lmms-eval API -------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="autoselect generate", disable=self.rank != 0):
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            images = self._images(request)
            prompt = self.processor.apply_chat_template(self._messages(context, images), add_generation_prompt=True)
            inputs = self._inputs(prompt, images)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            with torch.inference_mode():
                out = self.model.generate(**inputs, **self._kwargs(), do_sample=False,
                                          max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)))
            text = self.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            answers.append(text.strip())
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results = []
        for request in tqdm(requests, desc="autoselect loglikelihood", disable=self.rank != 0):
            context, target = request.args[0], request.args[1]
            images = self._images(request)
            doc = self.task_dict[request.args[4]][request.args[5]][request.args[3]]
            continuation = target if isinstance(target, str) else target(doc)
            example = encode_example(self.processor, self._messages(context, images, continuation), images)
            batch = {k: (v[None] if k in ("input_ids", "labels") else v).to(self._device) for k, v in example.items()}
            labels = batch.pop("labels")
            with torch.inference_mode():
                logits = self.model(**batch, **self._kwargs()).logits.float()
            answer = labels[0] != IGNORE_INDEX
            # pruning shortened the prompt; the answer is at the end of the sequence either way
            logits = logits[0, -int(answer.sum()) - 1 : -1]
            targets = labels[0, answer]
            logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
            results.append((float(logprobs.sum()), bool((logits.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("multi-round generation is not supported by the autoselect model")
