"""Train an AutoSelect scorer with Ray Train + DeepSpeed, track it in MLflow, register it.

    python pipelines/train.py --config pipelines/configs/tiny-llava.yaml
    ray job submit --working-dir . -- python pipelines/train.py --config pipelines/configs/mini-llava.yaml
    python pipelines/train.py --config cfg.yaml --set ray.num_workers=4 --set optim.steps=2000

Reads the shards of ``pipelines/preprocess.py`` as a Ray Dataset whose CPU actors decode the
images and run the backbone's processor (each worker streams its split of ready tensors), runs ``pipelines/training/loop.py`` on ``ray.num_workers`` workers with DeepSpeed ZeRO,
checkpoints to ``ray.storage_path`` (local or ``s3://``), resumes from the last checkpoint when
a worker dies (``ray.max_failures``), logs to MLflow (sqlite by default, or a server) and
registers the scorer as a new version of ``mlflow.registered_model``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.data
from ray.data import ActorPoolStrategy, ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from safetensors import safe_open

from autoselect.model import WEIGHTS_NAME
from mlops import registry, storage
from pipelines.preprocessing.parquet_reads import read_parquet
from pipelines.preprocessing.shards import ImageTensors, has_encoded_images
from pipelines.training import AUTOSELECT_DIR
from pipelines.training.config import TrainConfig, load_train_config
from pipelines.training.loop import train_loop_per_worker
from pipelines.training.progress import TrainingProgress


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else key, item, out)
    else:
        out[prefix] = value
    return out


def scaling_config(config: TrainConfig) -> ScalingConfig:
    """The worker group: how many, what each reserves, how the group is spread over nodes."""
    return ScalingConfig(
        num_workers=config.ray.num_workers,
        use_gpu=config.ray.use_gpu,
        resources_per_worker={"CPU": config.ray.cpus_per_worker, **({"GPU": 1} if config.ray.use_gpu else {})},
        placement_strategy=config.ray.placement_strategy,
    )


def run_config(config: TrainConfig, run_name: str) -> RunConfig:
    fs, path = storage.resolve(config.ray.storage_path, config.data.s3_endpoint)
    return RunConfig(
        name=run_name,
        storage_path=path,
        storage_filesystem=fs if storage.is_s3(config.ray.storage_path) else None,
        failure_config=FailureConfig(max_failures=config.ray.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=config.ray.num_to_keep),
    )


READ_CPUS = 0.1


def ingest_options() -> ExecutionOptions:
    """Ray Train's ingest options with the rows' order kept (Ray Data's reproducibility setting), which
    a seeded shuffle and a resumed run's skip of the batches it saw rely on."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def training_input(config: TrainConfig) -> ray.data.Dataset:
    """The shards as the workers stream them. Shards holding image bytes go through
    ``ImageTensors`` on ``data.decode_actors`` CPU actors, which
    decode each image and run the backbone's processor (``model.path``), before Ray Train splits
    the stream between the workers; shards that stored the pixels are read as they are."""
    fs, data_path = storage.resolve(config.data.train, config.data.s3_endpoint)
    # reading is I/O: a small CPU share, so the reads still get scheduled beside actors that hold
    # the CPUs Ray Train leaves to Ray Data (a whole CPU each would wait on them for ever)
    dataset = read_parquet(data_path, filesystem=fs, num_cpus=READ_CPUS)
    if not has_encoded_images(dataset.schema()):
        return dataset
    return dataset.map_batches(
        ImageTensors,
        fn_constructor_kwargs={"model": config.model.path},
        batch_format="pyarrow",
        batch_size=config.data.batch_size,
        compute=ActorPoolStrategy(size=config.data.decode_actors),
        num_cpus=config.data.decode_cpus,
        udf_modifying_row_count=False,
    )


def train(config: TrainConfig, config_path: str | None = None) -> dict[str, Any]:
    """Run the job; returns a summary (run id, checkpoint, registered version, final metrics)."""
    if not config.data.train:
        raise ValueError("data.train is empty: point it at the data/ folder written by pipelines/preprocess.py")
    if Path(config.model.path).exists():  # workers run in their own folders: pass local paths absolute
        config.model.path = str(Path(config.model.path).resolve())
    dataset = training_input(config)

    tracking_uri = config.tracking_uri()
    experiment_id = registry.setup_tracking(tracking_uri, config.mlflow.experiment, config.mlflow.artifact_location)
    with mlflow.start_run(experiment_id=experiment_id, run_name=config.name) as run:
        run_id = run.info.run_id
        mlflow.log_params(flatten("", config.to_dict(), {}))
        mlflow.log_dict(config.to_dict(), "train_config.json")
        if config_path:
            mlflow.log_artifact(config_path)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": config.to_dict(), "run_id": run_id, "tracking_uri": tracking_uri},
            scaling_config=scaling_config(config),
            torch_config=TorchConfig(backend="nccl" if config.ray.use_gpu else "gloo"),
            run_config=run_config(config, f"{config.name}-{run_id[:8]}"),
            datasets={"train": dataset},
            dataset_config=DataConfig(execution_options=ingest_options()),
        )
        with TrainingProgress(tracking_uri, run_id, config.optim.steps):
            result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        autoselect_config = config.autoselect_config()
        with result.checkpoint.as_directory() as directory:
            registered = registry.log_and_register(
                Path(directory) / AUTOSELECT_DIR,
                config.mlflow.registered_model,
                tags={
                    "backbone": config.model.path,
                    "budget": str(autoselect_config.budget),
                    "vision_width": str(registry_width(Path(directory) / AUTOSELECT_DIR)),
                    "vlm_dtype": saved_vlm_dtype(Path(directory) / AUTOSELECT_DIR),
                    "run_name": config.name,
                },
            )
        summary = {
            "run_id": run_id,
            "experiment_id": experiment_id,
            "tracking_uri": tracking_uri,
            "checkpoint": result.checkpoint.path,
            "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
            **registered,
        }
        mlflow.log_dict(summary, "summary.json")
    return summary


def registry_width(autoselect_dir: Path) -> int | None:
    return json.loads((autoselect_dir / "config.json").read_text()).get("vision_width")


def saved_vlm_dtype(autoselect_dir: Path) -> str:
    """The frozen VLM's dtype during training, as the workers recorded it ("auto" resolved per machine)."""
    with safe_open(str(autoselect_dir / WEIGHTS_NAME), framework="pt") as handle:
        return (handle.metadata() or {}).get("vlm_dtype", "unknown")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see pipelines/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--num-workers", type=int, help="shortcut for --set ray.num_workers=N")
    parser.add_argument("--use-gpu", action="store_true", help="shortcut for --set ray.use_gpu=true")
    args = parser.parse_args(argv)
    overrides = list(args.set)
    if args.num_workers is not None:
        overrides.append(f"ray.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides.append("ray.use_gpu=true")
    try:
        config = load_train_config(args.config, overrides)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True)
    summary = train(config, args.config)
    print(json.dumps(summary, indent=2, default=str))
    print(f"\nMLflow run {summary['run_id']} at {summary['tracking_uri']}; "
          f"registered {summary['registered_model']} version {summary['version']}; checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
