"""The Ray Serve deployment: FastAPI ingress, batching by resolved K, alias reloads without downtime.

    serve run serve/config.yaml               # local; see the YAML for args and autoscaling
    serve deploy serve/config.yaml            # a running cluster (RAY_ADDRESS / --address)

Routes: ``POST /v1/chat/completions`` (OpenAI chat, ``stream`` as SSE), ``GET /v1/models``,
``GET /healthz``, ``POST /admin/reload`` (re-resolve the scorer alias on the replica that
answers; a ``user_config`` change reaches every replica).
"""

# No `from __future__ import annotations`: Serve re-creates the route methods, and FastAPI must
# see real classes (not strings) in their signatures to tell `Request`/body params from query params.
import asyncio
import hmac
import os
import time
import uuid
from typing import Any, AsyncIterator

import mlflow
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from mlflow.exceptions import MlflowException
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from mlops.registry import resolve_version
from mlops.tracking import resolve_tracking_uri
from serve.config import LiveConfig, ServeArgs
from serve.engine import Completion, Job, Prepared, Scorer, load_backbone, load_scorer, prepare, run_batch
from serve.errors import APIError, install_error_handlers
from serve.images import ImageLoader
from serve.schemas import (
    AssistantMessage, AutoSelectUsage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, Delta, ErrorResponse, ModelCard, ModelList, Usage,
)

api = FastAPI(title="AutoSelect", description="OpenAI-compatible chat over a VLM with learned visual-token pruning")
install_error_handlers(api)

_REQUEST_LIMIT: dict[str, int | None] = {"bytes": None}  # per replica process, set by its constructor


def set_request_limit(max_bytes: int) -> None:
    """Module-level on purpose: Serve ships the deployment class by value, this module by reference."""
    _REQUEST_LIMIT["bytes"] = max_bytes


@api.middleware("http")
async def limit_request_size(request: Request, call_next):
    """Refuse bodies over the replica's limit before anything reads them (a declared length is
    required for POST, so a chunked upload cannot slip past the cap)."""
    limit = _REQUEST_LIMIT["bytes"]
    if limit is not None and request.method == "POST":
        declared = request.headers.get("content-length")
        if declared is None:
            return APIError("a Content-Length header is required", status=411, code="length_required").response()
        if not declared.isdigit() or int(declared) > limit:
            return APIError(f"request body of {declared} bytes is over the limit of {limit} bytes", status=413,
                            code="request_too_large").response()
    return await call_next(request)


VISUAL_TOKENS_HEADER = "x-autoselect-visual-tokens"  # "kept/total" for the request's images
SCORER_VERSION_HEADER = "x-autoselect-scorer-version"


def _autoselect_usage(c: Completion) -> AutoSelectUsage:
    p = c.prepared
    return AutoSelectUsage(visual_tokens_kept=c.kept_total, visual_tokens_total=p.tokens_total,
                           budget=p.budget, images=p.images, scorer_version=p.scorer.version, scorer_alias=p.scorer.alias,
                           batch_size=c.batch_size)


def _usage(c: Completion) -> Usage:
    return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                 total_tokens=c.prompt_tokens + c.completion_tokens)


def _headers(p: Prepared, kept_total: int) -> dict[str, str]:
    """Streams send headers before generating, so they carry the planned K; bodies the measured one."""
    return {VISUAL_TOKENS_HEADER: f"{kept_total}/{p.tokens_total}",
            SCORER_VERSION_HEADER: p.scorer.version}


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


@serve.deployment(name="AutoSelectServer", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
@serve.ingress(api)
class AutoSelectServer:
    def __init__(self, args: ServeArgs | dict[str, Any]) -> None:
        self.args = ServeArgs.model_validate(args)
        mlflow.set_tracking_uri(resolve_tracking_uri(self.args.tracking_uri))
        self.api_key = None
        if self.args.api_key_env:
            self.api_key = os.environ.get(self.args.api_key_env)
            if not self.api_key:  # never fall back to an open server because a secret is missing
                raise RuntimeError(f"api_key_env={self.args.api_key_env!r} is set but that variable is empty")
        set_request_limit(self.args.request_byte_limit)
        self.backbone = load_backbone(self.args.backbone, self.args.dtype)
        self.images = ImageLoader(self.args.images)
        self.scorer_uri = self.args.scorer_uri
        self.scorer: Scorer = load_scorer(self.scorer_uri, self.backbone.vlm)  # swapped whole, never mutated
        self.model_name = self.args.served_model_name or self.scorer.name
        self.started = int(time.time())
        self._reload_lock = asyncio.Lock()
        self.generate_batch.set_max_batch_size(self.args.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    # ---- Serve hooks ------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` changed (``serve deploy``): tune batching, re-resolve the alias."""
        live = LiveConfig.model_validate(user_config or {})
        if live.max_batch_size:
            self.generate_batch.set_max_batch_size(live.max_batch_size)
        if live.batch_wait_timeout_s is not None:
            self.generate_batch.set_batch_wait_timeout_s(live.batch_wait_timeout_s)
        self.scorer_uri = live.scorer_uri or self.args.scorer_uri
        await self.reload_scorer()

    async def reload_scorer(self) -> dict[str, Any]:
        """Load what the alias points at now and swap it in; in-flight requests keep their scorer."""
        async with self._reload_lock:
            current = self.scorer
            try:
                version = await asyncio.to_thread(resolve_version, self.scorer_uri)
                if (version.name, str(version.version), self.scorer_uri) == (current.name, current.version, current.uri):
                    return {"changed": False, "scorer": current.describe()}
                self.scorer = await asyncio.to_thread(load_scorer, self.scorer_uri, self.backbone.vlm, version)
            except (MlflowException, OSError, ValueError) as exc:
                raise APIError(f"could not reload {self.scorer_uri}: {exc}; still serving v{current.version}",
                               status=503, type="server_error", code="reload_failed") from None
            return {"changed": True, "previous": current.describe(), "scorer": self.scorer.describe()}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def generate_batch(self, jobs: list[Job]) -> list[Completion | APIError]:
        """Concurrent requests share forward passes (grouped by scorer, resolved K and sampling)."""
        return await asyncio.to_thread(run_batch, jobs, self.backbone, asyncio.get_running_loop())

    # ---- helpers ------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("missing or invalid API key (Authorization: Bearer <key>)", status=401,
                           code="invalid_api_key")

    async def _complete(self, job: Job) -> Completion:
        result = await self.generate_batch(job)
        if isinstance(result, Exception):
            raise result
        return result

    async def _stream(self, job: Job, request: ChatCompletionRequest, completion_id: str) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(**kwargs) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=self.model_name, **kwargs)

        task = asyncio.ensure_future(self._complete(job))
        task.add_done_callback(lambda _: job.deltas.put_nowait(None))  # after every delta already queued
        try:
            yield _sse(chunk(choices=[ChunkChoice(delta=Delta(role="assistant", content=""))]))
            while (delta := await job.deltas.get()) is not None:
                yield _sse(chunk(choices=[ChunkChoice(delta=Delta(content=delta))]))
            try:
                completion = await task
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                error = exc if isinstance(exc, APIError) else APIError(f"{type(exc).__name__}: {exc}", status=500,
                                                                        type="server_error", code="internal_error")
                yield _sse(ErrorResponse(error=error.body))
            else:
                yield _sse(chunk(choices=[ChunkChoice(delta=Delta(), finish_reason=completion.finish_reason)],
                                 autoselect=_autoselect_usage(completion)))
                if request.stream_options and request.stream_options.include_usage:
                    yield _sse(chunk(choices=[], usage=_usage(completion)))
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()  # client gone: drop our interest (the shared batch runs on for the others)

    # ---- routes -------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, "scorer_version": self.scorer.version,
                "replica": serve.get_replica_context().replica_id.unique_id}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self.authorize(request)
        info = {"backbone": self.backbone.path, **self.scorer.describe()}
        return ModelList(data=[ModelCard(id=self.model_name, created=self.started, autoselect=info)])

    @api.post("/admin/reload")
    async def admin_reload(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return {"replica": serve.get_replica_context().replica_id.unique_id, **await self.reload_scorer()}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self.authorize(request)
        if body.model != self.model_name:
            raise APIError(f"model {body.model!r} is not served here; available: [{self.model_name!r}]",
                           status=404, param="model", code="model_not_found")
        prepared = await asyncio.to_thread(prepare, body, self.scorer, self.backbone, self.images, self.args)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if body.stream:
            job = Job(prepared, deltas=asyncio.Queue())
            return StreamingResponse(self._stream(job, body, completion_id), media_type="text/event-stream",
                                     headers=_headers(prepared, prepared.kept_total))
        completion = await self._complete(Job(prepared))
        response = ChatCompletion(
            id=completion_id, created=int(time.time()), model=self.model_name,
            choices=[Choice(message=AssistantMessage(content=completion.text), finish_reason=completion.finish_reason)],
            usage=_usage(completion), autoselect=_autoselect_usage(completion),
        )
        return JSONResponse(response.model_dump(), headers=_headers(prepared, completion.kept_total))


def build_app(args: ServeArgs) -> Application:
    """Application builder for ``import_path: serve.app:build_app`` (Serve validates ``args``)."""
    return AutoSelectServer.bind(args)
