"""The main job on embedded defaults (`make demo`): from a fresh clone to a served, pruned,
real-weight VLM on the shipped scenes recipe (`pipelines/configs/mini-llava-scenes.yaml`: the
three-item garment questions, the straight-through form trained under top-K, chosen on val in session 29;
read by top-K for half of K and the DPP for the rest, chosen on val in session 37),
with every product part running for real on this machine.

  1. backbone    mini-LLaVA (DINOv2-S + SmolLM2-135M from PyPI wheels) with the committed scenes
                 alignment R2 (projector + LM LoRA, artifacts/mini-llava-scenes-R2/)
  2. corpora     three-item scenes on plain backgrounds: one Fashion-MNIST garment (1/6-1/4 of the side)
                 and two Open Clip Art drawings (Debian packages), fixed splits
  3. champion    the committed scorer (artifacts/mini-llava-scenes-R2/scorer/) registered in MLflow as `champion`
  4. preprocess  Ray Data: the train split's garment questions -> parquet shards (+ quarantine counts)
  5. challenger  a short run of the same recipe: Ray Train + DeepSpeed ZeRO-2 on 2 workers, registered
  6. evaluate    the champion with the baselines and the challenger on the same val scenes, each
                 version tagged with its results (`pipelines/evaluate.py --tag-version`)
  7. promote     `champion` moves only if the challenger wins (`promote --require retention_avg>@champion`)
  8. serve       Ray Serve (OpenAI API) with the champion, one real request with a test scene
  9. summary     the champion's margins over random and uniform; where the report, plots and MLflow UI are

The promotion is a choice, so it is made on the val half of the held-out scenes; the test-split
numbers of this recipe are docs/results.md. Re-running reuses what is cached (backbone, corpora,
shards, the registered champion, a challenger with the same settings). Everything stays on
127.0.0.1 and under outputs/ and .cache/.

    python examples/demo.py [--train-steps N] [--eval-limit N] [--fresh]

Where the frozen VLM runs in float32 (a CPU without native bf16: 2-4x slower a step) the challenger
trains 40 steps and 64 val scenes are read instead of 60 and 120, so that a fresh clone on 2 cores
still finishes in about half an hour (docs/pipelines.md has the timings).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from pathlib import Path

STEPS = 9
RECIPE = Path("pipelines/configs/mini-llava-scenes.yaml")
ALIGNMENT = Path("artifacts/mini-llava-scenes-R2")  # projector + LM LoRA of the backbone
BACKBONE = Path(".cache/backbones/mini-llava-plain-R")  # the recipe's model.path
CHAMPION = ALIGNMENT / "scorer"  # the scorer trained on that backbone, registered as `champion`
CORPORA = Path(".cache/corpora-plain-g6-d2")  # the recipe's export (its comment has the CLI form)
SCENES = {"scenes_background": "plain", "scenes_garment_side": (0.1667, 0.25), "scenes_drawings": (2, 2)}
TRAIN_TASKS = ["scenes_garment"]  # the recipe's training questions
# One registered model per backbone: a champion from another backbone (the session-19 demo's
# autoselect-demo-scenes) would keep its alias here and be compared on a VLM it was not trained on.
REGISTERED_MODEL = "autoselect-demo-scenes-r2"
PRUNERS = "autoselect,random,uniform,pooled,fastv,divprune,visionzip,oracle"  # every method the evaluation has
WORKLOAD = {"bfloat16": (60, 120), "float32": (40, 64)}  # (challenger steps, val scenes) by the VLM's dtype here
TASK = "scenes_garment"


class Progress:
    """``[i/9] title`` lines with the time each step took."""

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
    add("--out", type=Path, default=Path("outputs/demo"), help="reports, shards, summary (default: %(default)s)")
    add("--tracking-uri", default="sqlite:///outputs/mlflow.db", help="MLflow store (default: %(default)s)")
    add("--registered-model", default=REGISTERED_MODEL, help="MLflow registered model (default: %(default)s)")
    add("--train-steps", type=int, help="the challenger's optimiser steps (default: 60, 40 where the VLM runs in float32; the champion had 500)")
    add("--eval-limit", type=int, help="val scenes evaluated (default: 120, 64 where the VLM runs in float32)")
    add("--port", type=int, default=0, help="Serve HTTP port on 127.0.0.1 (default: a free one)")
    add("--fresh", action="store_true", help="retrain and re-preprocess even when cached")
    return parser


def fill_workload(args) -> str:
    """Set --train-steps and --eval-limit where not given, by the dtype `auto` gives the recipe's
    VLM on this machine (float32 on a CPU without native bf16); returns that dtype."""
    from mlops.backbone import default_device, resolve_dtype

    dtype = str(resolve_dtype("auto", default_device())).removeprefix("torch.")
    steps, limit = WORKLOAD["float32" if dtype == "float32" else "bfloat16"]
    args.train_steps = steps if args.train_steps is None else args.train_steps
    args.eval_limit = limit if args.eval_limit is None else args.eval_limit
    return dtype


def champion_step(args) -> str:
    """Register the committed scorer once (found again by its sha256) and make it the `champion`
    unless a champion is already set (a challenger that won an earlier demo keeps its title)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlops import registry

    from minillava.assets import file_sha256

    folder = CHAMPION
    sha = ":".join(file_sha256(folder / name) for name in ("config.json", "model.safetensors"))
    client = MlflowClient(args.tracking_uri)
    name = args.registered_model
    known = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("scorer_sha256") == sha]
    if known:
        version = str(min(int(v.version) for v in known))
        print(f"      the committed scorer is {name} version {version}")
    else:
        experiment_id = registry.setup_tracking(args.tracking_uri, "autoselect-demo")
        with mlflow.start_run(experiment_id=experiment_id, run_name="committed-scenes-scorer"):
            version = registry.log_and_register(folder, name, {
                "scorer_sha256": sha, "source": str(folder), "recipe": str(RECIPE), "budget": "28"})["version"]
        print(f"      registered {folder} as {name} version {version}")
    try:
        champion = str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        client.set_registered_model_alias(name, "champion", version)
        champion = version
    print(f"      {name}@champion -> version {champion}")
    return champion


def preprocess_step(args, corpora: Path, source_sha: str) -> dict:
    from pipelines import preprocess

    out = args.out / "preprocessed"
    source = corpora / "scenes.train.jsonl"
    key = {"input": source_sha, "model": str(BACKBONE), "tasks": TRAIN_TASKS,
           "shards": "image-bytes"}  # not the older pixel shards
    done = out / "demo_key.json"
    if not args.fresh and done.is_file() and json.loads(done.read_text()).get("key") == key:
        stats = json.loads(done.read_text())["stats"]
        print(f"      reusing {stats['data']} ({stats['rows_written']} rows)")
        return stats
    stats = preprocess.run(preprocess.PreprocessConfig(
        input=[str(source)], output=str(out), model=str(BACKBONE), image_root=str(corpora),
        tasks=TRAIN_TASKS, max_length=512, overwrite=True))
    done.write_text(json.dumps({"key": key, "stats": stats}, indent=2))
    return stats


def challenger_step(args, data: str, data_key: str) -> str:
    """A version trained by the recipe for ``--train-steps`` (the temperature anneals over the first
    half, as in the recipe), or the one an earlier run trained with the same settings."""
    from mlflow.tracking import MlflowClient

    from mlops.backbone import default_device, resolve_dtype
    from pipelines.train import train
    from pipelines.training.config import load_train_config

    steps = args.train_steps
    overrides = [
        f"model.path={BACKBONE}", f"data.train={data}", f"optim.steps={steps}",
        f"autoselect.temperature_steps={max(1, steps // 2)}", f"optim.checkpoint_every={steps}", "optim.log_every=5",
        f"mlflow.tracking_uri={args.tracking_uri}", f"mlflow.registered_model={args.registered_model}",
        "mlflow.experiment=autoselect-demo", "ray.storage_path=outputs/ray", "name=demo-scenes-challenger",
    ]
    config = load_train_config(RECIPE, overrides)
    # the resolved dtype, not "auto": a scorer trained over a bf16 VLM is not reused on a float32 machine
    dtype = str(resolve_dtype(config.model.dtype, default_device())).removeprefix("torch.")
    key = hashlib.sha256(json.dumps([config.to_dict(), data_key, dtype], sort_keys=True).encode()).hexdigest()[:16]
    client = MlflowClient(args.tracking_uri)
    if not args.fresh:
        for version in client.search_model_versions(f"name='{args.registered_model}'"):
            if version.tags.get("demo_key") == key:
                print(f"      reusing version {version.version} (same settings and data)")
                return str(version.version)
    summary = train(config)
    client.set_model_version_tag(args.registered_model, summary["version"], "demo_key", key)
    client.set_registered_model_alias(args.registered_model, "challenger", summary["version"])
    metrics = summary["metrics"]
    print(f"      trained {metrics.get('step')} steps, loss {metrics.get('loss', float('nan')):.3f}; "
          f"registered {args.registered_model} version {summary['version']} (@challenger)")
    return str(summary["version"])


def evaluate_step(args, version: str, out: Path, earlier: Path | None = None) -> dict:
    """Evaluate a version with every method on the val scenes and tag it with the results
    (``evaluate.py --tag-version``). With ``earlier`` (the champion's report from this run) the
    baselines and the all-token cells come from it (``--baselines-from --reuse-all-tokens``): only
    the version's own cells run, and all tokens on a first and a last batch as the check."""
    from pipelines import evaluate

    uri = f"models:/{args.registered_model}/{version}"
    reuse = ["--baselines-from", str(earlier), "--reuse-all-tokens"] if earlier is not None else []
    code = evaluate.main([
        "--model", str(BACKBONE), "--corpora", str(CORPORA), "--autoselect", uri, "--tag-version", uri,
        "--budgets", "28", "--pruners", PRUNERS, "--tasks", TASK, "--split", "val", "--limit", str(args.eval_limit),
        "--position-policy", "repack", "--out", str(out), "--tracking-uri", args.tracking_uri, *reuse,
    ])
    if code != 0:
        raise RuntimeError(f"evaluation of version {version} failed (exit {code})")
    return json.loads((out / "report.json").read_text())


def promote_step(args, challenger: str) -> bool:
    """`champion` moves to the challenger only if its retention beats the champion's, both measured
    on the same scenes (promote refuses versions evaluated under other settings)."""
    from pipelines import promote

    return promote.main(["--model", args.registered_model, "--version", challenger, "--alias", "champion",
                         "--require", "retention_avg>@champion", "--tracking-uri", args.tracking_uri]) == 0


def margins(report: dict) -> dict:
    """The champion's accuracy minus random's and uniform's on the same scenes, ± paired stderr."""
    paired = report["paired"]["28"]
    return {name: {"difference": paired[name][TASK]["difference"], "stderr": paired[name][TASK]["stderr"]}
            for name in ("random", "uniform")}


def sample_scene(corpora: Path) -> tuple[bytes, str, str]:
    """The first garment scene of the test half: its image, question and the garment's name."""
    from pipelines.corpora import load_records
    from pipelines.evaluation.tasks.base import split_of
    from pipelines.preprocessing.corpus import conversation_turns

    record = next(r for r in load_records(corpora, "scenes", "heldout")
                  if r["task"] == TASK and split_of(r["id"]) == "test")
    question, answer = conversation_turns(record["conversations"])[0]  # as training and evaluation read it
    return (corpora / record["image"]).read_bytes(), question, answer


def serve_step(args, scorer_uri: str, image: bytes, question: str, expected: str) -> dict:
    """Start the Serve app on loopback, send one chat request with a scene, stop it."""
    import socket

    import requests
    from ray import serve

    from serve.app import AutoSelectServer
    from serve.config import ServeArgs

    port = args.port
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    app = AutoSelectServer.options(num_replicas=1, ray_actor_options={"num_cpus": 0.5}).bind(
        ServeArgs(backbone=str(BACKBONE), scorer_uri=scorer_uri, tracking_uri=args.tracking_uri, default_max_tokens=16))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app, name="autoselect", route_prefix="/")
        body = {"model": args.registered_model, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{base64.b64encode(image).decode()}"}},
            {"type": "text", "text": question}]}]}
        response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300)
        response.raise_for_status()
        answer = response.json()
    finally:
        serve.shutdown()
    print(f"      POST http://127.0.0.1:{port}/v1/chat/completions: {question!r} with a test scene")
    text = answer["choices"][0]["message"]["content"]
    print(f"      answer: {text!r} (the scene's garment: {expected!r}; one free-form answer, not a measure of accuracy)")
    print(f"      usage: {json.dumps(answer['usage'])}")
    return {"question": question, "answer": text, "expected": expected, "usage": answer["usage"]}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    dtype = fill_workload(args)
    print(f"the frozen VLM runs in {dtype} here: a {args.train_steps}-step challenger, {args.eval_limit} val scenes "
          "(--train-steps, --eval-limit)", flush=True)
    progress = Progress()
    import ray

    from minillava.aligned import build_aligned_mini_llava
    from minillava.assets import file_sha256
    from mlops.tracking import resolve_tracking_uri
    from pipelines.corpora import ExportSettings, export_corpora

    args.out.mkdir(parents=True, exist_ok=True)
    args.tracking_uri = resolve_tracking_uri(args.tracking_uri)  # absolute: workers and replicas run elsewhere
    name = args.registered_model

    progress.step(1, "backbone: mini-LLaVA (DINOv2-S/14 + SmolLM2-135M) with the committed scenes alignment")
    build_aligned_mini_llava(ALIGNMENT / "projector.safetensors", BACKBONE, lora=ALIGNMENT / "lm_lora.safetensors")
    print(f"      {BACKBONE}")

    progress.step(2, "corpora: a garment and two drawings on plain backgrounds (Fashion-MNIST + Open Clip Art), fixed held-out splits")
    corpora = export_corpora(CORPORA, ExportSettings(**SCENES)).path
    print(f"      {corpora}")

    progress.step(3, "champion: the committed scorer in the MLflow registry")
    champion = champion_step(args)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        progress.step(4, "preprocess the train split's garment questions with Ray Data")
        source_sha = file_sha256(corpora / "scenes.train.jsonl")  # keys the shards and the challenger
        stats = preprocess_step(args, corpora, source_sha)
        print(f"      in {stats['rows_in']}, written {stats['rows_written']}, quarantined {stats['rows_quarantined']}")

        progress.step(5, f"challenger: the recipe for {args.train_steps} steps with Ray Train + DeepSpeed (2 workers)")
        challenger = challenger_step(args, stats["data"], source_sha)

        progress.step(6, f"evaluate on {args.eval_limit} val scenes: the champion with the baselines, then the challenger")
        report = evaluate_step(args, champion, args.out / "eval-champion")
        challenger_report = evaluate_step(args, challenger, args.out / "eval-challenger", args.out / "eval-champion" / "report.json")

        progress.step(7, "promote: `champion` moves only if the challenger beats it")
        promoted = promote_step(args, challenger)

        progress.step(8, "serve the champion with Ray Serve and send one real request")
        image, question, expected = sample_scene(corpora)
        served = serve_step(args, f"models:/{name}@champion", image, question, expected)
    finally:
        ray.shutdown()

    progress.step(9, "summary")
    total = progress.finish()
    reports = {"champion": report, "challenger": challenger_report}
    accuracy = {who: r["results"]["autoselect"]["28"]["tasks"][TASK] for who, r in reports.items()}
    full = report["results"]["full"]["all"]["tasks"][TASK]["score"]
    summary = {
        "registered_model": name, "champion": challenger if promoted else champion, "challenger": challenger,
        "promoted": promoted, "split": "val", "n": accuracy["champion"]["n"], "full_accuracy": full,
        "accuracy": {who: a["score"] for who, a in accuracy.items()},
        "retention_pct": {who: a["retention"] for who, a in accuracy.items()},
        "margins_of_version": champion, "margins": margins(report),
        "served": served, "seconds": {**progress.timings, "total": total},
        "reports": [str(args.out / d / "report.md") for d in ("eval-champion", "eval-challenger")],
        "plots": [str(args.out / "eval-champion" / p) for p in ("retention_vs_budget.png", "kept_patches.png")],
        "mlflow_ui": f"mlflow ui --backend-store-uri {args.tracking_uri} --port 5000",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nOn {summary['n']} val scenes at K = 28 of 256 (full tokens: {full:.3f}), the champion (version {champion}) "
          f"keeps {accuracy['champion']['retention']:.1f}% of full-token accuracy, the challenger (version {challenger}) "
          f"{accuracy['challenger']['retention']:.1f}%: {'promoted' if promoted else 'not promoted'}.")
    print(f"version {champion} minus the baselines (accuracy, paired on the same scenes): " + "; ".join(
        f"{k} {v['difference']:+.3f} ± {v['stderr']:.3f}" for k, v in summary["margins"].items()))
    print(f"reports: {', '.join(summary['reports'])}\nplots:   {', '.join(summary['plots'])}")
    print(f"MLflow:  {summary['mlflow_ui']}  (then http://127.0.0.1:5000)\nsummary: {args.out / 'summary.json'}")
    print(f"total:   {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
