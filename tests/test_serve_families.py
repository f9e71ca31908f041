"""The Serve app over HTTP on every tiny backbone family: usage counts the adapter's plan.

For each family one application serves that family's tiny VLM with a scorer registered for it in
a sqlite MLflow registry in tmp. A request's ``visual_tokens_total`` is its images' real visual
tokens (LLaVA-NeXT: not its row-newline placeholders; Idefics3: every view), and
``usage.prompt_tokens`` is the processor's prompt less the visual tokens that were dropped, which
is what the LLM prefills. Needs Ray (the session's ``ray_local``), like ``tests/test_serve.py``.
"""

from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from mlops.backbone import TINY_PREFIX, load_processor
from serve.config import ServeArgs
from serve.local import register_scorer

pytestmark = pytest.mark.slow

QUESTION = "What is in the image?"
# visual tokens of one 32 x 32 image, known from each tiny model's geometry (tiny_backbones.py)
N_OF_32 = {
    "llava": 64,  # 32 px, patch 4: 8 x 8 patches, CLS dropped
    "llava_next": 80,  # base view 16 + 2 x 2 crops of 16 (64); its 88 placeholders add 8 row newlines
    "qwen2_vl": 16, "qwen2_5_vl": 16, "qwen3_vl": 16,  # 8 x 8 patches, merge 2 x 2
    "gemma3": 16,  # 64 patches pooled to 4 x 4
    "idefics3": 5 * 16,  # 4 crops and the global view, 16 tokens each
}


def png(side: int = 32, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(*urls: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


def prompt_length(family: str, sides: list[int], text: str = QUESTION) -> int:
    """The unpruned prompt as the family's processor encodes it (placeholders included)."""
    processor = load_processor(TINY_PREFIX + family)
    content = [{"type": "image"}] * len(sides) + [{"type": "text", "text": text}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    pictures = [Image.open(io.BytesIO(base64.b64decode(png(s, seed).split(",", 1)[1]))) for seed, s in enumerate(sides)]
    return int(processor(text=[prompt], images=pictures, return_tensors="pt")["input_ids"].shape[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_http(ray_local):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite registry for every family's scorer (a new store costs seconds of schema migrations)."""
    return tmp_path_factory.mktemp("serve-families")


@pytest.fixture(scope="module", params=sorted(N_OF_32))
def family_url(request, serve_http, store):
    """One application per family, replacing the previous one (one replica at a time on 2 CPUs)."""
    from ray import serve

    from serve.app import AutoSelectServer

    family, root = request.param, store
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    name = f"tiny-{family}".replace("_", "-")
    register_scorer(tracking, name, backbone=TINY_PREFIX + family, budget=0.5, seed=1, alias="champion",
                    artifact_location=(root / "artifacts").as_uri())
    args = ServeArgs(backbone=TINY_PREFIX + family, dtype="float32", scorer_uri=f"models:/{name}@champion",
                     tracking_uri=tracking, batch_wait_timeout_s=0.2, max_batch_size=4)
    serve.run(AutoSelectServer.options(num_replicas=1).bind(args), name="family", route_prefix="/")
    return family, name, serve_http


def post(url: str, model: str, messages: list[dict], budget=None) -> dict:
    payload = {"model": model, "messages": messages, "temperature": 0, "max_tokens": 4}
    if budget is not None:
        payload["autoselect"] = {"budget": budget}
    response = requests.post(f"{url}/v1/chat/completions", json=payload, timeout=120)
    assert response.status_code == 200, response.text
    return {**response.json(), "header": response.headers["x-autoselect-visual-tokens"]}


def test_usage_counts_the_planned_visual_tokens_and_the_prefill(family_url):
    family, model, url = family_url
    n = N_OF_32[family]
    length = prompt_length(family, [32])
    for budget, kept in ((None, None), (0.5, None), (4, None), (1.0, n)):
        out = post(url, model, user(png(32)), budget)
        usage = out["autoselect"]
        assert usage["visual_tokens_total"] == n, (family, usage)
        views = n // N_OF_32["qwen2_vl"] if family == "idefics3" else 1  # Idefics3's budget applies per view
        expected = kept if kept is not None else views * (4 if budget == 4 else round(0.5 * n / views))
        assert usage["visual_tokens_kept"] == expected, (family, budget, usage)
        assert out["header"] == f"{expected}/{n}"
        assert out["usage"]["prompt_tokens"] == length - (n - expected), (family, budget, out["usage"])


def test_concurrent_requests_of_one_k_share_a_batch_and_keep_their_own_usage(family_url):
    family, model, url = family_url
    n = N_OF_32[family]
    texts = [QUESTION, "Describe the picture.", QUESTION]
    with ThreadPoolExecutor(len(texts)) as pool:
        outs = list(pool.map(lambda t: post(url, model, user(png(32), text=t), 0.5), texts))
    assert max(o["autoselect"]["batch_size"] for o in outs) >= 2, outs
    for text, out in zip(texts, outs):
        kept = out["autoselect"]["visual_tokens_kept"]
        assert out["usage"]["prompt_tokens"] == prompt_length(family, [32], text) - (n - kept)


def test_two_images_of_different_sizes_resolve_their_own_k(family_url):
    """Qwen-VL: a 32 x 32 and a 48 x 48 image have N 16 and 36, a ratio keeps 8 and 18."""
    family, model, url = family_url
    if not family.startswith("qwen"):
        pytest.skip("native resolution only: the other tiny families give every image the same N")
    out = post(url, model, user(png(32, 0), png(48, 1)), 0.5)
    assert (out["autoselect"]["visual_tokens_total"], out["autoselect"]["visual_tokens_kept"]) == (52, 26)
    assert out["usage"]["prompt_tokens"] == prompt_length(family, [32, 48]) - 26
