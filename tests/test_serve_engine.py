"""The Serve engine without Ray, on the built-in tiny LLaVA (N = 64) and an untrained scorer.

Batches group by the resolved K, usage counts each request's own pruned prompt, streamed pieces
add up to the final text (multi-byte characters included), and generation never holds the
processor lock that `prepare` needs. Every wait has a timeout, so nothing here can hang.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from autoselect import AutoSelectConfig, AutoSelectModel
from mlops.backbone import TINY_LLAVA, TINY_PREFIX
from serve.config import ServeArgs
from serve.engine import IncrementalDecoder, Job, Scorer, load_backbone, prepare, run_batch
from serve.images import ImageLoader
from serve.schemas import ChatCompletionRequest

N = 64  # visual tokens per image of the tiny LLaVA
ARGS = ServeArgs(backbone=TINY_LLAVA, require_image=False)
WAIT_S = 60  # generous for a loaded 2-core machine; a hang fails instead


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(TINY_LLAVA, "float32")


@pytest.fixture(scope="module")
def scorer(backbone) -> Scorer:
    model = AutoSelectModel.attach(backbone.vlm, AutoSelectConfig(budget=16)).eval()
    return Scorer(model, "models:/tiny@test", "tiny", "1", "test", None)


def image_url(seed: int, height: int = 32, width: int = 32) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def request(budget=None, images: int = 1, text: str = "What is in the image?", height: int = 32,
            **extra) -> ChatCompletionRequest:
    parts = [{"type": "image_url", "image_url": {"url": image_url(seed, height)}} for seed in range(images)]
    body = {"model": "tiny", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
            "temperature": 0, "max_tokens": 6, **extra}
    if budget is not None:
        body["autoselect"] = {"budget": budget}
    return ChatCompletionRequest.model_validate(body)


def prepared(scorer, backbone, budget=None, **kwargs):
    return prepare(request(budget, **kwargs), scorer, backbone, ImageLoader(ARGS.images), ARGS)


class InlineLoop:
    """Stands in for the event loop `Job.emitter` schedules on: runs each delta at once."""

    def call_soon_threadsafe(self, callback, *args) -> None:
        callback(*args)


def drain(queue: asyncio.Queue) -> list[str]:
    pieces = []
    while not queue.empty():
        pieces.append(queue.get_nowait())
    return pieces


def spy_generate(monkeypatch, backbone, probe=None) -> list[list[int]]:
    """Record each ``vlm.generate`` call's real (unpadded) prompt lengths; ``probe`` wraps its streamer."""
    calls, original = [], backbone.vlm.generate

    def generate(**kwargs):
        calls.append(kwargs["attention_mask"].sum(dim=1).tolist())
        if probe is not None:
            kwargs["streamer"] = probe(kwargs["streamer"])
        return original(**kwargs)

    monkeypatch.setattr(backbone.vlm, "generate", generate)
    return calls


def test_requests_group_by_resolved_k_not_by_how_the_budget_was_asked(scorer, backbone):
    keys = {budget: prepared(scorer, backbone, budget).group_key for budget in (None, 16, 0.25, 0.5, 4)}
    assert keys[None] == keys[16] == keys[0.25]  # the default 16, K=16 and 0.25 of N=64
    assert len({keys[16], keys[0.5], keys[4]}) == 3
    assert prepared(scorer, backbone, 0.25, images=2).group_key == keys[16]  # K per image, whatever the count
    assert prepared(scorer, backbone, images=0).group_key != keys[16]
    assert prepared(scorer, backbone, 16, temperature=0.7).group_key != keys[16]


def test_usage_counts_each_requests_own_pruned_prompt(scorer, backbone, monkeypatch):
    calls = spy_generate(monkeypatch, backbone)
    jobs = [Job(prepared(scorer, backbone, budget, images=images))
            for budget, images in ((4, 1), (0.25, 2), (0.5, 1), (16, 1), (N, 1))]
    results = run_batch(jobs, backbone, InlineLoop())
    assert all(not isinstance(r, Exception) for r in results), results
    assert [r.kept_per_image for r in results] == [4, 16, 32, 16, N]
    assert [r.batch_size for r in results] == [1, 2, 1, 2, 1]  # 0.25 and 16 shared a generate
    for result in results:
        p = result.prepared
        assert result.prompt_tokens == len(p.example["input_ids"]) - p.images * (N - result.kept_per_image)
    # what the LLM really prefilled, row by row, in run_batch's group order (K=4, 16, 32, 64)
    assert calls == [[results[0].prompt_tokens], [results[1].prompt_tokens, results[3].prompt_tokens],
                     [results[2].prompt_tokens], [results[4].prompt_tokens]]
    assert results[1].prompt_tokens != results[3].prompt_tokens  # two images vs one, same K


@pytest.fixture(scope="module")
def next_model():
    """LLaVA-NeXT: N follows the image's shape (80 patch tokens for 32 x 32, 48 for 32 x 16), and
    each image has more placeholders than visual tokens (a row newline per row: 88 and 52)."""
    backbone = load_backbone(TINY_PREFIX + "llava_next", "float32")
    model = AutoSelectModel.attach(backbone.vlm, AutoSelectConfig(budget=4)).eval()
    return backbone, Scorer(model, "models:/next@test", "next", "1", "test", None)


def run_ragged(next_model, monkeypatch):
    """0.5 of N=80 and of N=48 are two K; K=40 batches images of both N (N as the adapter plans it)."""
    backbone, scorer = next_model
    calls = spy_generate(monkeypatch, backbone)
    jobs = [Job(prepared(scorer, backbone, budget, height=height)) for budget, height in ((0.5, 32), (0.5, 16), (40, 16))]
    assert [job.prepared.tokens_per_image for job in jobs] == [80, 48, 48]
    results = run_batch(jobs, backbone, InlineLoop())
    assert all(not isinstance(r, Exception) for r in results), results
    return results, calls


def test_each_request_keeps_its_own_k_when_n_differs(next_model, monkeypatch):
    results, calls = run_ragged(next_model, monkeypatch)
    # Usage reports what the model kept. The group of two asked in two ways (0.5 of 80, 40): it gets
    # the resolved K. The lone 0.5 goes as asked and resolves against the image's 48 patch tokens.
    assert [(r.kept_per_image, r.batch_size) for r in results] == [(40, 2), (24, 1), (40, 2)]
    assert [r.kept_per_image for r in results] == [job.kept_per_image for job in (r.prepared for r in results)]
    assert [len(rows) for rows in calls] == [2, 1]


def test_usage_counts_the_prefill_when_n_differs(next_model, monkeypatch):
    results, calls = run_ragged(next_model, monkeypatch)
    assert calls == [[results[0].prompt_tokens, results[2].prompt_tokens], [results[1].prompt_tokens]]
    # the newline slots stay: 88 placeholders less 40 dropped patch tokens
    assert results[0].prompt_tokens == len(results[0].prepared.example["input_ids"]) - (80 - 40)


def test_incremental_decoder_holds_back_half_characters(backbone):
    tokenizer = backbone.tokenizer
    text = "Größe naïve café 🙂 déjà vu — 日本 ok 👍🏽!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(backbone.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # the case is exercised
    decoded: list[int] = []  # tokens per decode call

    def decode(tokens: list[int]) -> str:
        decoded.append(len(tokens))
        return backbone.decode(tokens)

    decoder, pieces = IncrementalDecoder(decode), []
    for i in range(1, len(ids) + 1):
        pieces.append(decoder.step(ids[:i]))
    pieces.append(decoder.step(ids, final=True))
    assert "".join(pieces) == backbone.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert max(decoded) <= 8 < len(ids)  # a window of a character or two, never the whole answer


def test_streamed_pieces_add_up_to_the_final_text(scorer, backbone):
    jobs = [Job(prepared(scorer, backbone, budget, max_tokens=24, text=text), deltas=asyncio.Queue())
            for budget, text in ((16, "What is in the image?"), (0.25, "Describe the picture."), (4, "Which colour?"))]
    results = run_batch(jobs, backbone, InlineLoop())
    for job, result in zip(jobs, results):
        assert not isinstance(result, Exception), result
        pieces = drain(job.deltas)
        assert result.completion_tokens > 0 and all(pieces)
        assert "".join(pieces) == result.text


def test_generation_does_not_hold_the_processor_lock(scorer, backbone, monkeypatch):
    """Mid-generation (a few tokens already streamed and decoded), `prepare` on another thread completes."""
    seen: dict[str, object] = {}

    class Probe(BaseStreamer):
        def __init__(self, inner) -> None:
            self.inner, self.puts = inner, 0

        def put(self, value) -> None:
            self.inner.put(value)
            self.puts += 1
            if self.puts == 4:  # the prompt, then three new tokens
                seen["locked"] = backbone.lock.locked()
                other = threading.Thread(target=lambda: seen.setdefault("prepared", prepared(scorer, backbone, 0.5)),
                                         daemon=True)
                other.start()
                other.join(timeout=WAIT_S)
                seen["done"] = not other.is_alive()

        def end(self) -> None:
            self.inner.end()

    spy_generate(monkeypatch, backbone, Probe)
    job = Job(prepared(scorer, backbone, 16, max_tokens=8), deltas=asyncio.Queue())
    (result,) = run_batch([job], backbone, InlineLoop())
    assert not isinstance(result, Exception), result
    assert seen["locked"] is False and seen["done"] is True
    assert seen["prepared"].kept_per_image == 32


def prefill_lengths(monkeypatch, backbone) -> tuple[list[list[int]], object]:
    """Per ``generate``, the real (unpadded) length of each row of the prompt the VLM receives, checked
    against the decoder's first (prefill) call: its 2-D mask where it gets one, else its padded width."""
    calls, decoder = [], backbone.vlm.get_decoder()
    original_generate = backbone.vlm.generate
    prefill: list = []

    def generate(**kwargs):
        prefill.clear()
        out = original_generate(**kwargs)
        lengths = kwargs["attention_mask"].sum(dim=1).tolist()
        rows, width, mask = prefill[0]
        assert rows == len(lengths) and width == kwargs["attention_mask"].shape[1]
        assert mask is None or mask == lengths, (mask, lengths)
        calls.append(lengths)
        return out

    def record(_module, _args, kwargs):
        if not prefill:
            mask = kwargs.get("attention_mask")
            two_d = isinstance(mask, torch.Tensor) and mask.dim() == 2
            prefill.append((*kwargs["inputs_embeds"].shape[:2], mask.sum(1).tolist() if two_d else None))

    monkeypatch.setattr(backbone.vlm, "generate", generate)
    handle = decoder.register_forward_pre_hook(record, with_kwargs=True)
    return calls, handle


def run_recording_prefill(monkeypatch, backbone, jobs) -> tuple[list, list[list[int]]]:
    """``run_batch`` on ``jobs`` (none may fail) and the prompt lengths each ``generate`` prefilled."""
    calls, handle = prefill_lengths(monkeypatch, backbone)
    try:
        results = run_batch(jobs, backbone, InlineLoop())
    finally:
        handle.remove()
    assert all(not isinstance(r, Exception) for r in results), results
    return results, calls


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3"])
def test_every_family_batches_two_requests_through_the_engine(family, monkeypatch):
    """Per-token tensors (Qwen's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``) lose their
    batch axis in ``prepare`` like ``input_ids``, so ``collate`` can pad them into one batch; usage
    counts what the decoder prefilled."""
    backbone = load_backbone(TINY_PREFIX + family, "float32")
    model = AutoSelectModel.attach(backbone.vlm, AutoSelectConfig(budget=0.5)).eval()
    scorer = Scorer(model, f"models:/{family}@test", family, "1", "test", None)
    jobs = [Job(prepare(request(text=text), scorer, backbone, ImageLoader(ARGS.images), ARGS))
            for text in ("What is in the image?", "Describe it.")]
    assert jobs[0].prepared.group_key == jobs[1].prepared.group_key
    results, calls = run_recording_prefill(monkeypatch, backbone, jobs)
    assert [r.batch_size for r in results] == [2, 2] and all(r.completion_tokens > 0 for r in results)
    assert calls == [[r.prompt_tokens for r in results]]
    assert all(r.kept == tuple(p.k for p in r.prepared.plan) for r in results)


def test_two_images_of_different_sizes_keep_their_own_k_and_usage_counts_the_prefill(monkeypatch):
    """Qwen2.5-VL: a 32 x 32 and a 48 x 48 image have N 16 and 36; a ratio keeps 8 and 18. Such a
    request shares a batch only with the same ratio, never with an int K."""
    backbone = load_backbone(TINY_PREFIX + "qwen2_5_vl", "float32")
    model = AutoSelectModel.attach(backbone.vlm, AutoSelectConfig(budget=0.5)).eval()
    scorer = Scorer(model, "models:/qwen@test", "qwen", "1", "test", None)
    parts = [{"type": "image_url", "image_url": {"url": image_url(seed, side, side)}} for seed, side in ((0, 32), (1, 48))]

    def two_images(budget, text="What differs?"):
        body = {"model": "qwen", "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
                "temperature": 0, "max_tokens": 4, "autoselect": {"budget": budget}}
        return Job(prepare(ChatCompletionRequest.model_validate(body), scorer, backbone, ImageLoader(ARGS.images), ARGS))

    jobs = [two_images(0.5), two_images(0.5, "Which is larger?"), two_images(8)]
    assert [(p.n, p.k) for p in jobs[0].prepared.plan] == [(16, 8), (36, 18)]
    assert jobs[0].prepared.tokens_total == 52 and jobs[0].prepared.kept_total == 26
    assert jobs[0].prepared.kept_per_image is None and jobs[2].prepared.kept_per_image == 8
    assert jobs[0].prepared.group_key == jobs[1].prepared.group_key != jobs[2].prepared.group_key
    results, calls = run_recording_prefill(monkeypatch, backbone, jobs)
    assert [r.kept for r in results] == [(8, 18), (8, 18), (8, 8)]
    assert [r.batch_size for r in results] == [2, 2, 1]
    assert calls == [[results[0].prompt_tokens, results[1].prompt_tokens], [results[2].prompt_tokens]]
    length = len(results[0].prepared.example["input_ids"])
    assert results[0].prompt_tokens == length - (16 - 8) - (36 - 18)


def test_serve_cost_bench_splits_a_request_with_the_apps_own_code(tmp_path):
    """bench/serve_cost.py (the per-request cost breakdown behind docs/benchmarks.md) starts and
    reports each part for both budgets; the prompt it measures is the app's own pruned prompt."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "cost.json"
    done = subprocess.run(
        [sys.executable, str(root / "bench" / "serve_cost.py"), "--backbone", TINY_LLAVA, "--dtype", "float32",
         "--batch-sizes", "1,2", "--repeats", "1", "--max-tokens", "3", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["batch_size"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {(1, 1.0), (1, 1 / 9), (2, 1.0), (2, 1 / 9)}
    assert rows[1, 1.0]["visual_tokens"] == "64/64" and rows[1, 1 / 9]["visual_tokens"] == "7/64"
    assert rows[1, 1.0]["prompt_tokens"] - rows[1, 1 / 9]["prompt_tokens"] == 64 - 7
    for row in rows.values():
        for key in ("prepare_ms_per_request", "vision_ms_per_batch", "prefill_ms_per_batch", "generate_ms_per_batch"):
            assert row[key] > 0, (key, row)
    assert set(report["pruned_over_full"]) == {"1", "2"} and report["max_tokens"] == 3
    assert "| 2 | 0.1111 |" in done.stdout and "does not depend on K" in done.stdout
