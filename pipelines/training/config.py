"""The training job's configuration: one YAML per backbone under ``pipelines/configs/``.

Every section is a dataclass; ``autoselect`` is an `AutoSelectConfig`, its option groups nested
mappings (``autoselect: {training: {gate_attention: true}}``, ``--set
autoselect.training.gate_attention=true``). Validation runs on the driver before Ray starts any worker.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoselect import AutoSelectConfig
from autoselect.training import LR_SCHEDULES
from mlops.backbone import MINI_LLAVA
from mlops.tracking import MlflowSection, resolve_tracking_uri
from pipelines.training.config_io import from_mapping, set_dotted

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelSection:
    """The frozen VLM: a local folder or hub id (``from_pretrained``), the built-in real mini-LLaVA
    (default) or a built-in tiny id (``autoselect-testing/tiny-llava``, for tests and quick starts)."""

    path: str = MINI_LLAVA
    dtype: str = "auto"  # auto: bfloat16 on GPU and on CPUs with native bf16, else float32
    trust_remote_code: bool = False
    # checkpoint the frozen LLM's decoder layers: it keeps each layer's input, not its activations,
    # for one more LLM forward per step (~1.5x the LLM's compute: with frozen weights the backward
    # costs about one forward); the loss and gradients are the same (docs/pipelines.md)
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")


@dataclass
class DataSection:
    """Shards written by ``pipelines/preprocess.py`` (its ``data/`` folder), local or ``s3://``."""

    train: str = ""
    batch_size: int = 4  # per worker (DeepSpeed's micro batch)
    s3_endpoint: str | None = None
    # the training input's CPU actors (Ray Data): each reads shards, decodes the images and runs the
    # backbone's processor, so the GPUs get ready tensors; give enough that they never wait
    # (bench/data_path.py measures one actor's rows/s against the training step rate)
    decode_actors: int = 1
    # per actor; 0 on a small machine where Ray Train leaves Ray Data one CPU: the read's file
    # listing task needs a whole one, and an actor holding any of it would leave the read waiting
    decode_cpus: float = 1.0
    # rows each worker shuffles its stream over (Ray Data's local shuffle buffer), seeded by
    # optim.seed, the rank and the epoch, so a resumed run skips the very batches it had seen;
    # 0 reads the shards in file order
    shuffle_buffer: int = 0

    def __post_init__(self) -> None:
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 rows, got {self.shuffle_buffer}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.decode_actors < 1:
            raise ValueError(f"decode_actors must be >= 1, got {self.decode_actors}")
        if self.decode_cpus < 0:
            raise ValueError(f"decode_cpus must be >= 0, got {self.decode_cpus}")


@dataclass
class OptimSection:
    steps: int = 100
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"  # or "hold": warm up, hold the peak, decay over the last decay_fraction of the steps
    decay_fraction: float = 0.2
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class RaySection:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = "outputs/ray"  # local folder or s3://bucket/prefix (checkpoints)
    max_failures: int = 1
    num_to_keep: int = 2
    # how the workers' placement group is laid out over nodes (Ray Train's ScalingConfig):
    # PACK (default: as few nodes as possible), SPREAD, STRICT_PACK (one node) or
    # STRICT_SPREAD (one worker per node; waits until there are num_workers nodes)
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        # Ray's own list, imported here so that importing this module (pipelines/evaluate.py does,
        # for DTYPES) does not import Ray
        from ray.util.placement_group import VALID_PLACEMENT_GROUP_STRATEGIES

        if self.placement_strategy not in VALID_PLACEMENT_GROUP_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {sorted(VALID_PLACEMENT_GROUP_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")


@dataclass
class DeepSpeedSection:
    zero_stage: int = 2

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class TrainConfig:
    name: str
    model: ModelSection = field(default_factory=ModelSection)
    autoselect: AutoSelectConfig = field(default_factory=AutoSelectConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ray: RaySection = field(default_factory=RaySection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    mlflow: MlflowSection = field(default_factory=MlflowSection)

    def autoselect_config(self) -> AutoSelectConfig:
        """A copy of the method's config (checked when this config was built, on the driver)."""
        return copy.deepcopy(self.autoselect)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tracking_uri(self) -> str:
        return resolve_tracking_uri(self.mlflow.tracking_uri)


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read ``path`` and apply ``section.key=value`` overrides; errors name the file and key."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(data, key, value)
    return from_mapping(TrainConfig, data, where=str(path))
