"""Reliability: the S3 client retries transient failures (a flaky proxy in front of moto)."""

from __future__ import annotations

import http.server
import threading
from collections import Counter

import pytest
import requests

from mlops import storage

BUCKET = "reliability"


class FlakyProxy:
    """Forwards to moto, answering the first ``failures`` GETs of each object with 503 SlowDown."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream, self.failures, self.seen = upstream, failures, Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                key = (self.command, self.path.split("?")[0])
                proxy.seen[key] += 1
                if self.command == "GET" and "/" in self.path.strip("/") and proxy.seen[key] <= proxy.failures:
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                upstream = requests.request(self.command, proxy.upstream + self.path, headers=headers, data=data, timeout=30)
                self.send_response(upstream.status_code)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(name, value)
                size = upstream.headers.get("Content-Length", "0") if self.command == "HEAD" else str(len(upstream.content))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(upstream.content)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

            def log_message(self, *_args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_object(moto_s3, monkeypatch):
    for key, value in moto_s3.env.items():
        monkeypatch.setenv(key, value)
    moto_s3.client.create_bucket(Bucket=BUCKET)
    moto_s3.client.put_object(Bucket=BUCKET, Key="shard.bin", Body=b"x" * 1000)
    yield moto_s3
    moto_s3.client.delete_object(Bucket=BUCKET, Key="shard.bin")
    moto_s3.client.delete_bucket(Bucket=BUCKET)


def test_s3_reads_survive_transient_503s(s3_object):
    with FlakyProxy(s3_object.endpoint_url, failures=2) as proxy:
        fs = storage.s3_filesystem(proxy.url)
        assert storage.read_bytes(fs, f"{BUCKET}/shard.bin") == b"x" * 1000
        gets = proxy.seen[("GET", f"/{BUCKET}/shard.bin")]
    assert gets == 3, f"expected 2 refused GETs and 1 retry that succeeded, saw {gets}"


def test_without_retries_the_same_failure_surfaces_as_an_error(s3_object):
    with FlakyProxy(s3_object.endpoint_url, failures=2) as proxy:
        fs = storage.s3_filesystem(proxy.url, max_attempts=1)
        with pytest.raises(OSError, match="SlowDown|503|SERVICE_UNAVAILABLE|reduce your request rate"):
            storage.read_bytes(fs, f"{BUCKET}/shard.bin")
