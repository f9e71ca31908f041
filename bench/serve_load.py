"""Bounded concurrent load on the Serve app: full budget vs pruned budget (N/9) in one run.

For each client concurrency (``--concurrency 1,8,32``), each round runs one phase per budget
(order alternating between rounds, so drift on a shared machine hits both alike): at least
``--requests`` chat completions with one image each (never fewer than two per client thread),
from that many client threads. Reports requests/s, p50/p95 latency and prompt tokens per budget
and concurrency, and the pruned/full ratios, as JSON and a markdown table.

    python bench/serve_load.py                                     # mini-LLaVA app started here (throwaway registry)
    python bench/serve_load.py --backbone autoselect-testing/tiny-llava --concurrency 4
    python bench/serve_load.py --url http://127.0.0.1:8000 --model autoselect-scorer [--api-key KEY]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np
import requests
from PIL import Image

from mlops.backbone import MINI_LLAVA, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parent.parent


def image_url(side: int = 224, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def local_app(backbone: str, max_batch_size: int) -> Iterator[tuple[str, str]]:
    """Ray on 127.0.0.1 + the app with one replica and an untrained scorer; stops what it started."""
    import ray
    from ray import serve

    from serve.app import AutoSelectServer
    from serve.config import ServeArgs
    from serve.local import register_scorer

    workdir, ray_dir = tempfile.mkdtemp(prefix="serve-bench-"), tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: socket paths
    tracking = f"sqlite:///{workdir}/mlflow.db"
    register_scorer(tracking, "bench-scorer", backbone=backbone, alias="champion", artifact_location=Path(workdir, "art").as_uri())
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(backbone=backbone, scorer_uri="models:/bench-scorer@champion", tracking_uri=tracking,
                         max_batch_size=max_batch_size)
        serve.run(AutoSelectServer.options(num_replicas=1, max_ongoing_requests=2 * max_batch_size).bind(args),
                  name="bench", route_prefix="/")
        yield f"http://127.0.0.1:{port}", "bench-scorer"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        for directory in (workdir, ray_dir):
            shutil.rmtree(directory, ignore_errors=True)


def phase(url: str, payload: dict, headers: dict, requests_: int, concurrency: int) -> dict:
    """``requests_`` completions from ``concurrency`` threads; latencies and wall time."""
    def one(_: int) -> tuple[float, dict]:
        start = time.perf_counter()
        response = requests.post(f"{url}/v1/chat/completions", json=payload, headers=headers, timeout=300)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_)))
    return {"wall_s": time.perf_counter() - start, "latencies": [r[0] for r in results], "last": results[-1][1],
            "batch_sizes": [r[1]["autoselect"]["batch_size"] for r in results]}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def summarise(phases: list[dict]) -> dict:
    latencies = [x for p in phases for x in p["latencies"]]
    last = phases[-1]["last"]
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / sum(p["wall_s"] for p in phases),
        "requests_per_s_by_round": [len(p["latencies"]) / p["wall_s"] for p in phases],
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p95_ms": 1e3 * percentile(latencies, 95),
        "mean_batch_size": statistics.mean(b for p in phases for b in p["batch_sizes"]),
        "prompt_tokens": last["usage"]["prompt_tokens"],
        "visual_tokens": f"{last['autoselect']['visual_tokens_kept']}/{last['autoselect']['visual_tokens_total']}",
    }


def run(url: str, model: str, api_key: str | None, budgets: dict[str, float], concurrency: int, args) -> dict:
    """One concurrency level: warm-up, then ``args.rounds`` rounds of one phase per budget."""
    requests_ = max(args.requests, 2 * concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    payloads = {name: {"model": model, "temperature": 0, "max_tokens": args.max_tokens, "autoselect": {"budget": budget},
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url()}},
                                                                 {"type": "text", "text": "Describe the picture."}]}]}
                for name, budget in budgets.items()}
    for name, payload in payloads.items():  # warm-up (and fail fast on a bad URL/model/key)
        phase(url, payload, headers, concurrency, concurrency)
    phases: dict[str, list[dict]] = {name: [] for name in budgets}
    for round_ in range(args.rounds):
        order = list(budgets) if round_ % 2 == 0 else list(reversed(budgets))
        for name in order:
            phases[name].append(phase(url, payloads[name], headers, requests_, concurrency))
    stats = {name: {"budget": budgets[name], **summarise(p)} for name, p in phases.items()}
    full, pruned = stats["full"], stats["pruned"]
    return {
        "url": url, "model": model, "concurrency": concurrency, "requests_per_phase": requests_,
        "rounds": args.rounds, "max_tokens": args.max_tokens, "budgets": stats,
        "throughput_ratio_pruned_over_full": pruned["requests_per_s"] / full["requests_per_s"],
        "p50_latency_ratio_full_over_pruned": full["p50_ms"] / pruned["p50_ms"],
        "prompt_token_ratio_full_over_pruned": full["prompt_tokens"] / pruned["prompt_tokens"],
    }


def table(results: list[dict]) -> str:
    lines = ["| concurrency | budget | visual tokens | prompt tokens | req/s | p50 ms | p95 ms | mean batch | pruned/full req/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for name, s in result["budgets"].items():
            ratio = f"**{result['throughput_ratio_pruned_over_full']:.2f}x**" if name == "pruned" else ""
            lines.append(f"| {result['concurrency']} | {name} ({s['budget']:.4g}) | {s['visual_tokens']} | {s['prompt_tokens']} "
                         f"| {s['requests_per_s']:.2f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} | {s['mean_batch_size']:.2f} | {ratio} |")
    first = results[0]
    lines.append(f"\n{first['rounds']} rounds per concurrency, max_tokens {first['max_tokens']}; requests per phase: "
                 + ", ".join(f"{r['requests_per_phase']} at {r['concurrency']}" for r in results)
                 + f"; worst pruned/full throughput {min(r['throughput_ratio_pruned_over_full'] for r in results):.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running app; default: start one here")
    parser.add_argument("--model", default="autoselect-scorer", help="served model id (with --url)")
    parser.add_argument("--api-key", default=os.environ.get("AUTOSELECT_API_KEY"))
    parser.add_argument("--backbone", default=MINI_LLAVA,
                        help="for the app started here (default: %(default)s, the real mini-LLaVA built from the wheels)")
    parser.add_argument("--pruned-budget", default="1/9", help="ratio of N kept in the pruned phase (default: %(default)s)")
    parser.add_argument("--concurrency", default="1,8,32", help="client threads, one level or a comma list (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=16, help="per phase, at least 2 x concurrency (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8, help="for the app started here")
    parser.add_argument("--json-out", help="also write the JSON result here")
    args = parser.parse_args()
    try:
        levels = [int(level) for level in args.concurrency.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        parser.error(f"--concurrency wants positive integers, got {args.concurrency!r}")
    budgets = {"full": 1.0, "pruned": float(Fraction(args.pruned_budget))}
    if Path(args.backbone).exists():  # replicas do not share our working directory
        args.backbone = str(Path(args.backbone).resolve())

    with contextlib.ExitStack() as stack:
        url, model = (args.url.rstrip("/"), args.model) if args.url else stack.enter_context(local_app(args.backbone, args.max_batch_size))
        results = [run(url, model, args.api_key, budgets, level, args) for level in levels]
    report = {"backbone": None if args.url else args.backbone, "max_batch_size": None if args.url else args.max_batch_size,
              "cpu_native_bf16": cpu_has_native_bf16(), "cpus": os.cpu_count(),
              "levels": results,
              "worst_throughput_ratio_pruned_over_full": min(r["throughput_ratio_pruned_over_full"] for r in results)}
    print(json.dumps(report, indent=2))
    print(table(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
