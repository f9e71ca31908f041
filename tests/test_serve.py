"""The Serve app end to end on loopback: tiny LLaVA + a scorer from a sqlite MLflow registry in tmp.

Called with the official `openai` client and raw HTTP; every bad input gets an OpenAI-shaped 4xx
and the replica keeps serving; promotion gates move the alias and a reload (endpoint or
user_config) serves the new version; bounded load scales 1 -> 2 replicas and back.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from mlops.backbone import MINI_LLAVA, TINY_LLAVA
from pipelines import promote
from serve.config import ImagePolicy, LiveConfig, ServeArgs
from serve.local import register_scorer

pytestmark = pytest.mark.slow

MODEL = "tiny-scorer"
KEY_ENV, KEY = "AUTOSELECT_TEST_API_KEY", "test-key-7f3a"
BUCKET = "serve-images"
N = 64  # visual tokens per image of the tiny LLaVA
QUESTION = "What is in the image?"


def png(side: int = 32, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(*urls: str, text: str = QUESTION) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def body(messages=None, **extra) -> dict:
    return {"model": MODEL, "messages": messages or user(data_url(png())), "temperature": 0, "max_tokens": 6, **extra}


@dataclass
class Server:
    url: str
    tracking_uri: str
    artifacts: str

    def post(self, payload: dict, key: str | None = KEY, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}/v1/chat/completions", json=payload, headers=headers, timeout=120, **kwargs)

    def get(self, path: str) -> dict:
        response = requests.get(f"{self.url}{path}", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_args(server_tracking: str, **overrides) -> ServeArgs:
    return ServeArgs(backbone=TINY_LLAVA, scorer_uri=f"models:/{MODEL}@champion", tracking_uri=server_tracking, **overrides)


@pytest.fixture(scope="module")
def server(ray_local, moto_s3, tmp_path_factory):
    from ray import serve

    from serve.app import AutoSelectServer

    root = tmp_path_factory.mktemp("serve")
    tracking, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()
    register_scorer(tracking, MODEL, backbone=TINY_LLAVA, seed=1, metrics={"retention_avg": 0.97}, alias="champion", artifact_location=artifacts)
    moto_s3.client.create_bucket(Bucket=BUCKET)
    moto_s3.client.put_object(Bucket=BUCKET, Key="cat.png", Body=png(seed=5))

    args = app_args(
        tracking, api_key_env=KEY_ENV, batch_wait_timeout_s=0.1, max_batch_size=4,
        images=ImagePolicy(max_images=2, max_image_bytes=20_000, allowed_hosts=["images.example.com"],
                           allowed_s3_buckets=[BUCKET], s3_endpoint=moto_s3.endpoint_url),
    )
    env = {KEY_ENV: KEY, **{k: v for k, v in moto_s3.env.items() if k != "AWS_ENDPOINT_URL"}}

    app = AutoSelectServer.options(
        num_replicas=1, user_config={"reload_token": 0},
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env}},
    ).bind(args)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="autoselect", route_prefix="/")
        yield Server(f"http://127.0.0.1:{port}", tracking, artifacts)
    finally:
        serve.shutdown()


# ---- happy paths -----------------------------------------------------------------------------
def test_openai_client_plain_and_streaming(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    (card,) = client.models.list().data
    assert card.id == MODEL and card.model_extra["autoselect"]["alias"] == "champion"

    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(data_url(png())), max_tokens=6, temperature=0)
    assert raw.headers["x-autoselect-visual-tokens"] == "16/64"  # the registered scorer's default budget
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= 6
    assert answer.model_extra["autoselect"]["visual_tokens_kept"] == 16
    assert answer.model_extra["autoselect"]["visual_tokens_total"] == N

    stream = client.chat.completions.create(model=MODEL, messages=user(data_url(png())), max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # greedy: the stream spells the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_raw_http_sse_format_and_s3_image(server):
    response = server.post(body(stream=True), stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in events[:-1]]
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["autoselect"]["visual_tokens_kept"] == 16 and response.headers["x-autoselect-visual-tokens"] == "16/64"

    from_s3 = server.post(body(user(f"s3://{BUCKET}/cat.png")))
    inline = server.post(body(user(data_url(png(seed=5)))))
    assert from_s3.status_code == 200, from_s3.text
    assert from_s3.json()["choices"][0]["message"] == inline.json()["choices"][0]["message"]


def test_budget_per_request_sets_kept_tokens_and_prompt_length(server):
    results = {}
    for budget in (None, 4, 0.5, 1.0, N):
        extra = {} if budget is None else {"autoselect": {"budget": budget}}
        response = server.post(body(**extra))
        assert response.status_code == 200, response.text
        results[budget] = response.json()
        kept = results[budget]["autoselect"]["visual_tokens_kept"]
        assert response.headers["x-autoselect-visual-tokens"] == f"{kept}/{N}"
    assert [results[b]["autoselect"]["visual_tokens_kept"] for b in (None, 4, 0.5, 1.0, N)] == [16, 4, 32, N, N]
    full = results[N]["usage"]["prompt_tokens"]
    for budget, kept in ((None, 16), (4, 4), (0.5, 32)):
        assert results[budget]["usage"]["prompt_tokens"] == full - (N - kept)  # usage counts what the LLM prefilled
    assert results[1.0]["choices"] == results[N]["choices"]


def test_concurrent_requests_share_batches_by_budget(server):
    short, long_ = user(data_url(png(seed=1))), user(data_url(png(seed=2)), text="Describe the picture in one short sentence.")
    alone = {name: server.post(body(msgs)).json()["choices"][0]["message"]["content"]
             for name, msgs in (("short", short), ("long", long_))}
    jobs = [("short", short, 8), ("long", long_, 8), ("short", short, 8), ("long", long_, 8), ("short", short, 16)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(server.post, body(msgs, autoselect={"budget": k})) for _, msgs, k in jobs]
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    outs = [r.json() for r in responses]
    sizes = [o["autoselect"]["batch_size"] for o in outs]
    assert max(sizes) >= 2, sizes  # concurrent users shared a forward pass
    assert outs[-1]["autoselect"]["batch_size"] == 1  # the only budget-16 request never joins budget-8 ones
    assert all(o["autoselect"]["visual_tokens_kept"] == k for o, (_, _, k) in zip(outs, jobs))
    budget8 = {name: server.post(body(msgs, autoselect={"budget": 8})).json()["choices"][0]["message"]["content"]
               for name, msgs in (("short", short), ("long", long_))}
    for (name, _, k), out in zip(jobs, outs):  # left padding inside a shared batch changes no answer
        assert out["choices"][0]["message"]["content"] == (budget8[name] if k == 8 else alone[name])


# ---- bad input -----------------------------------------------------------------------------
GOOD = data_url(png())
BAD_CASES = {
    "malformed_json": (dict(data=b'{"model": "tiny-scorer", "messages": [', headers={"Content-Type": "application/json"}), 400, "invalid_json", "malformed JSON"),
    "wrong_type": ({"json": {"model": MODEL, "messages": "hello"}}, 400, "invalid_value", "messages"),
    "unknown_model": ({"json": body(model="gpt-4o")}, 404, "model_not_found", "gpt-4o"),
    "no_image": ({"json": body([{"role": "user", "content": "hi"}])}, 400, "image_required", "image_url"),
    "invalid_base64": ({"json": body(user("data:image/png;base64,@@not-base64@@"))}, 400, "invalid_base64", "base64"),
    "not_an_image": ({"json": body(user(data_url(b"definitely not a png" * 8)))}, 400, "invalid_image", "not a decodable image"),
    "image_too_large": ({"json": body(user(data_url(png(side=128))))}, 400, "image_too_large", "over the limit"),
    "budget_zero": ({"json": body(autoselect={"budget": 0})}, 400, "invalid_budget", "positive"),
    "budget_negative_ratio": ({"json": body(autoselect={"budget": -0.5})}, 400, "invalid_budget", "(0, 1]"),
    "budget_above_tokens": ({"json": body(autoselect={"budget": N + 1})}, 400, "invalid_budget", f"exceeds the {N} visual tokens"),
    "too_many_images": ({"json": body(user(GOOD, GOOD, GOOD))}, 400, "too_many_images", "limit is 2"),
    "prompt_too_long": ({"json": body(user(GOOD, text="describe " * 600))}, 400, "context_length_exceeded", "after pruning"),
    "max_tokens_too_large": ({"json": body(max_tokens=10_000)}, 400, "invalid_value", "max_tokens"),
    "remote_host_refused": ({"json": body(user("https://evil.example.org/cat.png"))}, 400, "image_host_not_allowed", "evil.example.org"),
    "s3_bucket_refused": ({"json": body(user("s3://other-bucket/cat.png"))}, 400, "image_host_not_allowed", "other-bucket"),
    "s3_missing_key": ({"json": body(user(f"s3://{BUCKET}/missing.png"))}, 400, "image_fetch_failed", "missing.png"),
    "no_api_key": ({"json": body(), "key": None}, 401, "invalid_api_key", "API key"),
    "wrong_api_key": ({"json": body(), "key": "nope"}, 401, "invalid_api_key", "API key"),
    "body_too_large": ({"data": b"{" + b" " * 2_000_000 + b"}", "headers": {"Content-Type": "application/json"}}, 413, "request_too_large", "over the limit"),
    "n_above_one": ({"json": body(n=2)}, 400, "unsupported_parameter", "n=1"),
    "placeholder_in_text": ({"json": body(user(GOOD, text="<image> twice"))}, 400, "invalid_value", "2 <image> tokens and 1 images"),
    "image_in_assistant_turn": ({"json": body([*user(GOOD), {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": GOOD}}]}])},
                                400, "invalid_value", "only allowed in user messages"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_gets_openai_error_and_replica_keeps_serving(server, case):
    request, status, code, words = BAD_CASES[case]
    request = dict(request)
    key = request.pop("key", KEY)
    headers = {**request.pop("headers", {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    response = requests.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60, **request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and words in error["message"], error
    assert server.post(body()).status_code == 200  # the next good request still succeeds


FUZZ_EXAMPLES = 120


def _json_values():
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True) | st.text(max_size=40)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                        max_leaves=12)


def _fuzzed_bodies():
    """Arbitrary JSON, and valid requests with one field replaced by arbitrary JSON."""
    from hypothesis import strategies as st

    good = body()
    fields = ["model", "messages", "temperature", "max_tokens", "stream", "top_p", "n", "stop", "autoselect", "seed"]
    mutated = st.builds(lambda field, value: {**good, field: value}, st.sampled_from(fields), _json_values())
    bad_part = st.builds(
        lambda value: {**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": value},
                                                                           {"type": "text", "text": QUESTION}]}]},
        _json_values(),
    )
    return _json_values() | mutated | bad_part


def test_fuzzed_requests_get_no_5xx_and_good_requests_keep_working(server):
    """A bounded fuzz of malformed bodies (hypothesis): every answer is a 2xx/4xx with an
    OpenAI-shaped error for 4xx, never a 5xx, and a good request after the fuzz still succeeds."""
    from hypothesis import HealthCheck, given, settings

    statuses: Counter = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(_fuzzed_bodies())
    def send(payload):
        data = json.dumps(payload).encode()  # NaN/Infinity go out as-is: not JSON, the server must say so
        response = requests.post(f"{server.url}/v1/chat/completions", data=data, timeout=120,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        statuses[response.status_code] += 1
        assert response.status_code < 500, (payload, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    send()
    raw = requests.post(f"{server.url}/v1/chat/completions", data=b"\xff{not json", timeout=60,
                        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400
    assert sum(statuses.values()) == FUZZ_EXAMPLES and statuses.keys() - {200, 400, 401, 413, 422}  == set(), statuses
    print(f"fuzz: {dict(statuses)}")
    assert server.post(body()).status_code == 200


def test_openai_client_raises_typed_errors(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="exceeds the 64 visual tokens"):
        client.chat.completions.create(model=MODEL, messages=user(GOOD), extra_body={"autoselect": {"budget": 65}})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


# ---- promotion and reload ---------------------------------------------------------------------
def test_promotion_gates_then_reload_serves_new_version(server, capsys):
    common = ["--tracking-uri", server.tracking_uri, "--model", MODEL]
    low = register_scorer(server.tracking_uri, MODEL, backbone=TINY_LLAVA, seed=2, metrics={"retention_avg": 0.90}, artifact_location=server.artifacts)
    high = register_scorer(server.tracking_uri, MODEL, backbone=TINY_LLAVA, seed=3, metrics={"retention_avg": 0.98}, artifact_location=server.artifacts)
    capsys.readouterr()

    assert promote.main([*common, "--version", low, "--require", "retention_avg>=0.95"]) == 1
    refused = capsys.readouterr().err
    assert "retention_avg = 0.9 (run metric) fails >= 0.95 (short by 0.05)" in refused and "unchanged" in refused
    assert promote.main([*common, "--version", high, "--require", "pope_f1>=0.8"]) == 1
    assert "pope_f1: not found" in capsys.readouterr().err
    assert promote.main([*common, "--version", high, "--require", "retention_avg>=0.95", "--require", "vision_width==32"]) == 0
    assert f"champion -> v{high} (was v1)" in capsys.readouterr().out
    assert promote.main([*common, "--list"]) == 0
    listing = capsys.readouterr().out
    assert f"v{high}" in listing and "aliases=[champion]" in listing and "retention_avg=0.9" in listing

    assert server.get("/v1/models")["data"][0]["autoselect"]["version"] == "1"  # not reloaded yet
    with ThreadPoolExecutor(4) as pool:  # requests in flight while the scorer is swapped
        inflight = [pool.submit(server.post, body(max_tokens=24)) for _ in range(4)]
        time.sleep(0.2)
        reload = requests.post(f"{server.url}/admin/reload", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        results = [f.result() for f in inflight]
    assert reload.status_code == 200, reload.text
    assert reload.json()["changed"] and reload.json()["scorer"]["version"] == high
    assert all(r.status_code == 200 for r in results)
    assert {r.json()["autoselect"]["scorer_version"] for r in results} <= {"1", high}
    assert server.get("/v1/models")["data"][0]["autoselect"]["version"] == high
    answer = server.post(body())
    assert answer.json()["autoselect"]["scorer_version"] == high and answer.headers["x-autoselect-scorer-version"] == high

    # a user_config change (`serve deploy`) calls reconfigure on every replica: re-resolve, or pin a version
    from ray import serve

    handle, replica = serve.get_app_handle("autoselect"), server.get("/healthz")["replica"]
    assert promote.main([*common, "--version", "1"]) == 0
    handle.reconfigure.remote({"reload_token": 1}).result()
    assert server.get("/healthz") == {"status": "ok", "model": MODEL, "scorer_version": "1", "replica": replica}
    handle.reconfigure.remote({"scorer_uri": f"models:/{MODEL}/{low}"}).result()
    assert server.post(body()).json()["autoselect"]["scorer_version"] == low
    handle.reconfigure.remote({}).result()
    assert server.get("/healthz")["scorer_version"] == "1"


# ---- autoscaling ---------------------------------------------------------------------------
def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    return status.deployments["AutoSelectServer"].replica_states.get("RUNNING", 0) if status else 0


def test_autoscaling_up_under_load_and_back_down(server):
    from ray import serve

    from serve.app import AutoSelectServer

    app = AutoSelectServer.options(
        max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.5},
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                            "upscale_delay_s": 1, "downscale_delay_s": 2, "metrics_interval_s": 0.5,
                            "look_back_period_s": 2},
    ).bind(app_args(server.tracking_uri, max_batch_size=4))
    serve.run(app, name="scale", route_prefix="/scale")
    try:
        assert running_replicas("scale") == 1
        stop, deadline, sent, codes = threading.Event(), time.monotonic() + 90, [0], []

        def load() -> None:  # bounded: stops once 2 replicas run, after 3000 requests or 90 s
            while not stop.is_set() and time.monotonic() < deadline and sent[0] < 3000:
                sent[0] += 1
                codes.append(requests.post(f"{server.url}/scale/v1/chat/completions", json=body(max_tokens=16), timeout=60).status_code)

        peak = 1
        with ThreadPoolExecutor(6) as pool:
            users = [pool.submit(load) for _ in range(6)]
            while time.monotonic() < deadline and peak < 2 and not all(u.done() for u in users):
                time.sleep(0.5)
                peak = max(peak, running_replicas("scale"))
            stop.set()
            for u in users:
                u.result()
        assert peak == 2, f"no scale-up after {sent[0]} requests"
        assert set(codes) == {200}

        until = time.monotonic() + 60
        while running_replicas("scale") != 1 and time.monotonic() < until:
            time.sleep(0.5)
        assert running_replicas("scale") == 1, "did not scale back down after the load stopped"
    finally:
        serve.delete("scale")


# ---- config files --------------------------------------------------------------------------
def test_shipped_serve_config_validates():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    ServeArgs.model_validate(app.args)
    assert app.args["backbone"] == ServeArgs().backbone == MINI_LLAVA  # a real backbone by default, not a test fixture
    (deployment,) = app.deployments
    LiveConfig.model_validate(deployment.user_config)
    assert deployment.ray_actor_options.num_cpus == 0.5
    assert deployment.autoscaling_config["max_replicas"] > deployment.autoscaling_config["min_replicas"]
    with pytest.raises(ValueError, match="scorer_urii"):
        ServeArgs.model_validate({**app.args, "scorer_urii": "x"})
