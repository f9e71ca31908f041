"""Typed application arguments (``applications[].args`` in ``serve/config.yaml``) and the live
``user_config``. Pydantic with ``extra="forbid"``: a typo fails the deploy instead of being ignored."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from mlops.backbone import MINI_LLAVA
from mlops.tracking import MlflowSection

DEFAULT_SCORER_URI = f"models:/{MlflowSection().registered_model}@champion"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImagePolicy(_Strict):
    """Where images may come from and how big they may be."""

    max_images: int = Field(4, ge=1)  # per request
    max_image_bytes: int = Field(10 * 2**20, ge=1)  # encoded size
    max_image_pixels: int = Field(4096 * 4096, ge=1)  # width * height, against decompression bombs
    allowed_hosts: list[str] = []  # http(s) image hosts (fnmatch patterns, e.g. "*.example.com"); empty: none
    allowed_s3_buckets: list[str] = []  # s3:// buckets ("*" = any); empty: none
    s3_endpoint: str | None = None  # e.g. http://minio:9000; default: AWS_ENDPOINT_URL[_S3]
    fetch_timeout_s: float = Field(10.0, gt=0)


class ServeArgs(_Strict):
    """What one application serves: a frozen VLM plus a registered AutoSelect scorer."""

    # local HF folder (model + processor); the built-in real mini-LLaVA (default: built once from the
    # wheels + committed projector, see mlops.backbone); or a built-in tiny id, for tests and quick starts
    backbone: str = MINI_LLAVA
    dtype: str = "auto"  # auto: bfloat16 on GPU and on CPUs with native bf16, else float32
    scorer_uri: str = DEFAULT_SCORER_URI  # models:/<name>@<alias> (or /<version>)
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    served_model_name: str | None = None  # the OpenAI `model` id; default: the registered model name
    default_max_tokens: int = Field(64, ge=1)
    max_tokens_limit: int = Field(512, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)  # after pruning; default: context - max_tokens
    require_image: bool = True  # refuse text-only requests (this app exists to prune images)
    api_key_env: str | None = None  # env var holding the bearer token; unset: no auth
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    images: ImagePolicy = ImagePolicy()
    # request body cap (413 above it); default: every allowed image inline as base64, plus 1 MiB of text
    max_request_bytes: int | None = Field(None, ge=1024)

    @property
    def request_byte_limit(self) -> int:
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return self.images.max_images * self.images.max_image_bytes * 4 // 3 + 2**20


class LiveConfig(_Strict):
    """``user_config``: applied to every replica by ``serve deploy`` without a restart.

    Any change (bump ``reload_token``) re-resolves the scorer alias; the model is swapped only if
    the alias now points at another version.
    """

    scorer_uri: str | None = None  # override ServeArgs.scorer_uri
    max_batch_size: int | None = Field(None, ge=1)
    batch_wait_timeout_s: float | None = Field(None, ge=0)
    reload_token: StrictInt | StrictFloat | str | None = None
