"""The main job on embedded defaults (`make demo`): from a fresh clone to a served, pruned,
real-weight VLM, with every product part running for real on this machine.

  1. backbone    mini-LLaVA (DINOv2-S + SmolLM2-135M from PyPI wheels) with the committed aligned projector
  2. corpora     Fashion-MNIST and Open Clip Art (Debian packages) exported with fixed held-out splits
  3. preprocess  Ray Data: the training subset -> parquet shards (+ quarantine counts)
  4. train       Ray Train + DeepSpeed ZeRO-2 on 2 local workers, MLflow (sqlite) run + registered version
  5. evaluate    AutoSelect vs random / uniform / DivPrune / VisionZip / FastV at N/9 on held-out data,
                 written to the version as tags (`pipelines/evaluate.py --tag-version`)
  6. promote     the `champion` alias moves if those tags show it beats random
  7. serve       Ray Serve (OpenAI API) with the promoted scorer, one real request with a packaged photo
  8. summary     where the report, plots and MLflow UI are

Re-running reuses what is cached (backbone, corpora, shards, a trained version with the same
settings). Everything stays on 127.0.0.1 and under outputs/ and .cache/.

    python examples/demo.py [--train-steps 80] [--eval-limit 40] [--fresh]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import sys
import time
from pathlib import Path

STEPS = 8
REGISTERED_MODEL = "autoselect-mini-llava"
PRUNERS = "autoselect,random,uniform,divprune,visionzip,fastv"
TASKS = "fmnist_vqa,clipart_category,spatial_fmnist"
PHOTO = "grace_hopper.jpg"  # ships with matplotlib


class Progress:
    """``[i/8] title`` lines with the time each step took."""

    def __init__(self) -> None:
        self.started = self.mark = time.time()
        self.timings: dict[str, float] = {}
        self.current: str | None = None

    def step(self, index: int, title: str) -> None:
        self._close()
        self.current, self.mark = title, time.time()
        print(f"\n[{index}/{STEPS}] {title}", flush=True)

    def _close(self) -> None:
        if self.current is not None:
            name = self.current.split()[0].rstrip(":")  # "backbone: mini-LLaVA ..." -> "backbone"
            self.timings[name] = round(time.time() - self.mark, 1)
            print(f"      ({self.timings[name]:.0f} s)", flush=True)

    def finish(self) -> float:
        self._close()
        self.current = None
        return round(time.time() - self.started, 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("outputs/demo"), help="report, shards, summary (default: %(default)s)")
    add("--tracking-uri", default="sqlite:///outputs/mlflow.db", help="MLflow store (default: %(default)s)")
    add("--budget", type=int, default=28, help="visual tokens kept per image, of 256 (default: %(default)s, ~N/9)")
    add("--train-records", type=int, default=480, help="training examples preprocessed (default: %(default)s)")
    add("--train-steps", type=int, default=80, help="optimiser steps (default: %(default)s)")
    add("--eval-limit", type=int, default=40, help="held-out examples per task (default: %(default)s)")
    add("--port", type=int, default=0, help="Serve HTTP port on 127.0.0.1 (default: a free one)")
    add("--fresh", action="store_true", help="retrain and re-preprocess even when cached")
    return parser


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_subset(corpora: Path, count: int, out: Path) -> Path:
    """Half Fashion-MNIST, half Clip Art category questions, from the TRAIN splits only (seeded)."""
    from pipelines.corpora import load_records

    rng = random.Random(0)
    fmnist = load_records(corpora, "fashion_mnist", "train")
    clipart = [r for r in load_records(corpora, "openclipart", "train") if r["task"] == "clipart_category"]
    chosen = rng.sample(fmnist, min(count // 2, len(fmnist))) + rng.sample(clipart, min(count - count // 2, len(clipart)))
    rng.shuffle(chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({k: r[k] for k in ("id", "image", "conversations")}) + "\n" for r in chosen))
    return out


def preprocess_step(subset: Path, model: Path, corpora: Path, out: Path, fresh: bool) -> dict:
    from pipelines import preprocess

    key = {"subset": file_sha(subset), "model": str(model), "shards": "image-bytes"}  # not the older pixel shards
    done = out / "demo_key.json"
    if not fresh and done.is_file() and json.loads(done.read_text()).get("key") == key:
        stats = json.loads(done.read_text())["stats"]
        print(f"      reusing {stats['data']} ({stats['rows_written']} rows)")
        return stats
    stats = preprocess.run(preprocess.PreprocessConfig(
        input=[str(subset)], output=str(out), model=str(model), image_root=str(corpora), overwrite=True))
    done.write_text(json.dumps({"key": key, "stats": stats}, indent=2))
    return stats


def train_step(args, model: Path, data: str, data_key: str) -> tuple[str, str]:
    """``(version, run_id)``: a registered version trained with these exact settings, or a new one."""
    from mlflow.tracking import MlflowClient

    from mlops.backbone import default_device, resolve_dtype
    from pipelines.train import train
    from pipelines.training.config import load_train_config

    overrides = [
        f"model.path={model}", f"data.train={data}", f"autoselect.budget={args.budget}",
        f"autoselect.temperature_steps={max(1, args.train_steps * 3 // 4)}", f"optim.steps={args.train_steps}",
        f"optim.checkpoint_every={args.train_steps}", "optim.log_every=5", f"optim.lr=1.0e-3",
        f"mlflow.tracking_uri={args.tracking_uri}", f"mlflow.registered_model={REGISTERED_MODEL}",
        "mlflow.experiment=autoselect-demo", "ray.storage_path=outputs/ray", "name=demo-mini-llava",
    ]
    config = load_train_config(Path("pipelines/configs/mini-llava.yaml"), overrides)
    # the resolved dtype, not "auto": a scorer trained over a bf16 VLM is not reused on a float32 machine
    dtype = str(resolve_dtype(config.model.dtype, default_device())).removeprefix("torch.")
    key = hashlib.sha256(json.dumps([config.to_dict(), data_key, dtype], sort_keys=True).encode()).hexdigest()[:16]
    client = MlflowClient(args.tracking_uri)
    if not args.fresh:
        for version in client.search_model_versions(f"name='{REGISTERED_MODEL}'"):
            if version.tags.get("demo_key") == key:
                print(f"      reusing version {version.version} (same settings and data)")
                return str(version.version), version.run_id
    summary = train(config)
    client.set_model_version_tag(REGISTERED_MODEL, summary["version"], "demo_key", key)
    metrics = summary["metrics"]
    print(f"      trained {metrics.get('step')} steps, loss {metrics.get('loss', float('nan')):.3f}; "
          f"registered {REGISTERED_MODEL} version {summary['version']}")
    return str(summary["version"]), summary["run_id"]


def evaluate_step(args, model: Path, version: str) -> dict:
    """Evaluate the version and tag it with the results (``evaluate.py --tag-version``)."""
    from pipelines import evaluate

    out = args.out / "eval"
    uri = f"models:/{REGISTERED_MODEL}/{version}"
    code = evaluate.main([
        "--model", str(model), "--autoselect", uri, "--tag-version", uri, "--budgets", str(args.budget),
        "--pruners", PRUNERS, "--tasks", TASKS, "--limit", str(args.eval_limit), "--out", str(out),
        "--tracking-uri", args.tracking_uri,
    ])
    if code != 0:
        raise RuntimeError(f"evaluation failed (exit {code})")
    return json.loads((out / "report.json").read_text())


def promote_step(args, version: str, report: dict) -> tuple[bool, dict]:
    """Move `champion` to the version if the tags its evaluation wrote show it beats random."""
    from mlflow.tracking import MlflowClient

    from pipelines import promote

    budget = str(args.budget)
    retention = {name: rows[budget]["average_retention"] for name, rows in report["results"].items() if budget in rows}
    code = promote.main(["--model", REGISTERED_MODEL, "--version", version, "--alias", "champion",
                         "--require", "retention_margin_vs_random>=0", "--tracking-uri", args.tracking_uri])
    tags = MlflowClient(args.tracking_uri).get_model_version(REGISTERED_MODEL, version).tags
    gates = ("retention_avg", "retention_margin_vs_random", "retention_margin_vs_best_baseline")
    return code == 0, {"retention_pct": retention, **{name: float(tags[name]) for name in gates if name in tags}}


def serve_step(args, model: Path, scorer_uri: str) -> dict:
    """Start the Serve app on loopback, send one chat request with a packaged photo, stop it."""
    import socket

    import requests
    from matplotlib.cbook import get_sample_data
    from ray import serve

    from serve.app import AutoSelectServer
    from serve.config import ServeArgs

    port = args.port
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    with get_sample_data(PHOTO) as handle:
        photo = base64.b64encode(handle.read()).decode()
    app = AutoSelectServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}).bind(
        ServeArgs(backbone=str(model), scorer_uri=scorer_uri, tracking_uri=args.tracking_uri, default_max_tokens=24))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="autoselect", route_prefix="/")
        body = {"model": REGISTERED_MODEL, "max_tokens": 24, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{photo}"}},
            {"type": "text", "text": "Describe the image in one sentence."}]}]}
        response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        answer = response.json()
    finally:
        serve.shutdown()
    print(f"      POST http://127.0.0.1:{port}/v1/chat/completions with {PHOTO}")
    print(f"      answer: {answer['choices'][0]['message']['content']!r}")
    print(f"      usage: {json.dumps(answer['usage'])}")
    return {"answer": answer["choices"][0]["message"]["content"], "usage": answer["usage"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = Progress()
    import ray
    import torch

    from autoselect.convert.aligned import build_aligned_mini_llava
    from pipelines.corpora import DEFAULT_OUT, export_corpora

    from mlops.tracking import resolve_tracking_uri

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)  # absolute: workers and replicas run elsewhere

    progress.step(1, "backbone: mini-LLaVA (DINOv2-S/14 + SmolLM2-135M) with the committed aligned projector")
    model = build_aligned_mini_llava().path.resolve()
    print(f"      {model}")

    progress.step(2, "corpora: Fashion-MNIST + Open Clip Art from Debian packages, fixed held-out splits")
    corpora = export_corpora(DEFAULT_OUT).path
    subset = training_subset(corpora, args.train_records, args.out / "corpus" / "train.jsonl")
    print(f"      {corpora}; training subset {subset} ({args.train_records} train-split records)")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        progress.step(3, "preprocess with Ray Data")
        stats = preprocess_step(subset, model, corpora, args.out / "preprocessed", args.fresh)
        print(f"      in {stats['rows_in']}, written {stats['rows_written']}, quarantined {stats['rows_quarantined']}")

        progress.step(4, f"train the scorer at K = {args.budget} of 256 with Ray Train + DeepSpeed (2 workers), MLflow tracking")
        version, run_id = train_step(args, model, stats["data"], file_sha(subset))

        progress.step(5, "evaluate AutoSelect against the baselines on held-out data")
        report = evaluate_step(args, model, version)

        progress.step(6, "promote in the MLflow registry (alias `champion` if AutoSelect beats random)")
        promoted, evaluation = promote_step(args, version, report)
        scorer_uri = f"models:/{REGISTERED_MODEL}@champion" if promoted else f"models:/{REGISTERED_MODEL}/{version}"
        print(f"      {'promoted' if promoted else 'NOT promoted (serving the version directly)'}: {scorer_uri}")

        progress.step(7, "serve with Ray Serve and send one real request")
        served = serve_step(args, model, scorer_uri)
    finally:
        ray.shutdown()

    progress.step(8, "summary")
    total = progress.finish()
    summary = {
        "backbone": str(model), "registered_model": REGISTERED_MODEL, "version": version, "run_id": run_id,
        "promoted": promoted, "evaluation": evaluation, "served": served, "seconds": {**progress.timings, "total": total},
        "report": str(args.out / "eval" / "report.md"), "plots": [str(args.out / "eval" / p) for p in ("retention_vs_budget.png", "kept_patches.png")],
        "mlflow_ui": f"mlflow ui --backend-store-uri {args.tracking_uri} --port 5000",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nAutoSelect at K = {args.budget}/256 keeps {evaluation['retention_pct']['autoselect']:.1f}% of full-token "
          f"accuracy (random: {evaluation['retention_pct']['random']:.1f}%); version {version} "
          f"{'is the champion' if promoted else 'was not promoted'}.")
    print(f"report:  {summary['report']}\nplots:   {', '.join(summary['plots'])}")
    print(f"MLflow:  {summary['mlflow_ui']}  (then http://127.0.0.1:5000)\nsummary: {args.out / 'summary.json'}")
    print(f"total:   {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
