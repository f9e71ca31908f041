"""One way to reach local paths and ``s3://`` URIs: a pyarrow filesystem plus a path.

Ray Data readers, our parquet writer and the image loader all take a pyarrow filesystem, so
resolving it once here keeps the S3 settings (endpoint override for MinIO/moto/Ceph, keys,
region) in one place. Keys found in the driver's environment are put into the filesystem
object explicitly, because Ray workers do not see environment changes made after they start.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_PREFIX = "s3://"
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def is_s3(uri: str) -> bool:
    return uri.startswith(S3_PREFIX)


def s3_endpoint_from_env() -> str | None:
    """The S3 endpoint override from the standard AWS variables, if any."""
    for name in ENDPOINT_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


#: attempts per S3 request (throttling, 5xx and connection errors are retried with backoff)
S3_MAX_ATTEMPTS_ENV = "AUTOSELECT_S3_MAX_ATTEMPTS"
DEFAULT_S3_MAX_ATTEMPTS = 5


def s3_filesystem(endpoint: str | None = None, max_attempts: int | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem; ``endpoint`` like ``http://127.0.0.1:9000`` (default: from the env).

    Transient failures (503 SlowDown, 500, dropped connections) are retried with the AWS SDK's
    standard strategy, ``max_attempts`` tries in all (default: $AUTOSELECT_S3_MAX_ATTEMPTS, else 5).
    """
    endpoint = endpoint or s3_endpoint_from_env()
    attempts = max_attempts or int(os.environ.get(S3_MAX_ATTEMPTS_ENV) or DEFAULT_S3_MAX_ATTEMPTS)
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs.update(
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ.get("AWS_SESSION_TOKEN"),
        )
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, s3_endpoint: str | None = None) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or an ``s3://bucket/key`` URI."""
    if is_s3(uri):
        return s3_filesystem(s3_endpoint), uri[len(S3_PREFIX):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """The inverse of :func:`resolve`: what to show a user for ``path`` on ``fs``."""
    return S3_PREFIX + path if isinstance(fs, pafs.S3FileSystem) else path


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(fs: pafs.FileSystem, path: str, payload: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True).encode())


def prepare_output(fs: pafs.FileSystem, path: str, overwrite: bool) -> None:
    """Make ``path`` an empty folder; refuse to mix a new run into an old one unless asked."""
    existing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    if existing:
        if not overwrite:
            raise FileExistsError(f"output {path!r} is not empty; pass --overwrite to replace it")
        fs.delete_dir_contents(path, missing_dir_ok=True)
    fs.create_dir(path, recursive=True)
