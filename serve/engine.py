"""What a replica does with a request, without Ray: validate and encode it, then generate a batch.

One replica holds one frozen VLM (loaded once) and one AutoSelect scorer over it; the scorer is
replaced as a whole (`Scorer`) when the registry alias moves. A request is pinned to the scorer
it was validated with, so a reload never changes the budget or the weights under a request that
is already in flight.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.generation.streamers import BaseStreamer

from autoselect import AutoSelectModel
from autoselect.backbones import ImagePlan, pruned_length
from autoselect.config import validate_budget
from autoselect.data import TOKEN_KEYS, collate
from mlops import registry
from mlops.backbone import load_registered, load_vlm_and_processor
from serve.config import ServeArgs
from serve.errors import APIError
from serve.images import ImageLoader
from serve.schemas import ChatCompletionRequest, ImagePart, Message

logger = logging.getLogger("ray.serve")


# ---- loading -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """The frozen VLM and its processor (tokenizer padding on the left, for batched generation)."""

    vlm: torch.nn.Module
    processor: Any
    path: str
    # request threads encode while the generation thread decodes: fast tokenizers are not safe
    # to share across threads ("Already borrowed"), so every use of the processor takes this lock,
    # only for that one call (never across ``generate``; streaming decodes a few tokens at a time)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def encode(self, messages: list[dict], images: list) -> dict[str, torch.Tensor]:
        with self.lock:
            prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.processor(text=[prompt], images=images or None, return_tensors="pt")

    def decode(self, tokens: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @property
    def context_length(self) -> int:
        return int(self.vlm.config.get_text_config().max_position_embeddings)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.vlm.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return ids | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())


def load_backbone(path: str, dtype: str = "auto") -> Backbone:
    """The shared loader (`mlops.backbone`), so serving sees exactly the VLM the scorer was trained on."""
    vlm, processor = load_vlm_and_processor(path, dtype)
    processor.tokenizer.padding_side = "left"
    return Backbone(vlm=vlm, processor=processor, path=path)


@dataclass(frozen=True)
class Scorer:
    """An AutoSelect model over the shared VLM, and the registry version it came from."""

    model: AutoSelectModel
    uri: str
    name: str
    version: str
    alias: str | None
    run_id: str | None

    def describe(self) -> dict[str, Any]:
        return {"scorer_uri": self.uri, "registered_model": self.name, "version": self.version,
                "alias": self.alias, "run_id": self.run_id, "default_budget": self.model.default_budget}


def alias_of(uri: str) -> str | None:
    last = uri.rstrip("/").rsplit("/", 1)[-1]
    return last.rsplit("@", 1)[1] if "@" in last else None


def load_scorer(uri: str, vlm: torch.nn.Module, version=None) -> Scorer:
    """Resolve ``uri`` (alias) to a version once, then load exactly that version onto ``vlm`` with
    the shared loader (`mlops.backbone.load_registered`, which refuses non-finite weights)."""
    version = version or registry.resolve_version(uri)
    model = load_registered(version, vlm, uri)
    return Scorer(model, uri, version.name, str(version.version), alias_of(uri), version.run_id)


# ---- requests ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A validated, encoded request: everything the batch needs, nothing left to fail on input."""

    example: dict[str, torch.Tensor]  # input_ids [L] + the processor's image tensors
    images: int
    plan: tuple[ImagePlan, ...]  # the adapter's (N_i, K_i) per image (per view for Idefics3), `PrunedVLM.plan`
    budget: int | float
    max_tokens: int
    temperature: float
    top_p: float
    scorer: Scorer

    @property
    def tokens_total(self) -> int:
        """Visual tokens of all the request's images (N summed; not their placeholders)."""
        return sum(p.n for p in self.plan)

    @property
    def kept_total(self) -> int:
        return sum(p.k for p in self.plan)

    @property
    def tokens_per_image(self) -> int | None:
        """N when every image has the same (0 without images), else None."""
        return _same([p.n for p in self.plan])

    @property
    def kept_per_image(self) -> int | None:
        """K when every image keeps the same (0 without images), else None."""
        return _same([p.k for p in self.plan])

    def pruned_length(self, kept: list[int] | None = None) -> int:
        """Prompt tokens the LLM prefills once each image keeps its planned K (or ``kept``, per image)."""
        return pruned_length(len(self.example["input_ids"]), list(self.plan), kept)

    @property
    def batch_budget(self) -> tuple[str, int | float]:
        """The one budget that reproduces this request's plan in a shared ``generate``: K itself when
        every image keeps the same K (0: no image), else the ratio as asked (it resolves per image)."""
        k = self.kept_per_image
        return ("k", k) if k is not None else ("ratio", self.budget)

    @property
    def group_key(self) -> tuple:
        """Requests that can share one ``generate`` call: what it depends on is the scorer, the
        resolved K (0: no image), not how it was asked for (0.25 and 16 of N=64 share), and sampling.
        A request whose images keep different K (a ratio of different N) shares only with that ratio."""
        sampling = (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)
        return id(self.scorer), self.batch_budget, sampling


def _same(values: list[int]) -> int | None:
    return 0 if not values else values[0] if len(set(values)) == 1 else None


def _hf_messages(messages: list[Message]) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> the processor's chat-template messages, plus the image URLs in order."""
    converted, urls = [], []
    for message in messages:
        parts: list[dict] = []
        if isinstance(message.content, str):
            parts.append({"type": "text", "text": message.content})
        for part in message.content if isinstance(message.content, list) else []:
            if isinstance(part, ImagePart):
                if message.role != "user":
                    raise APIError("image_url parts are only allowed in user messages", param="messages",
                                   code="invalid_value")
                urls.append(part.image_url.url)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        converted.append({"role": "system" if message.role == "developer" else message.role, "content": parts})
    return converted, urls


def prepare(request: ChatCompletionRequest, scorer: Scorer, backbone: Backbone, loader: ImageLoader,
            args: ServeArgs) -> Prepared:
    """Validate ``request`` and encode it; raises `APIError` (4xx) naming the first problem."""
    if request.n not in (None, 1):
        raise APIError("only n=1 is supported", param="n", code="unsupported_parameter")
    if request.stop:
        raise APIError("stop sequences are not supported", param="stop", code="unsupported_parameter")
    if request.tools:
        raise APIError("tools are not supported", param="tools", code="unsupported_parameter")
    max_tokens = request.max_completion_tokens or request.max_tokens or args.default_max_tokens
    if max_tokens > args.max_tokens_limit:
        raise APIError(f"max_tokens={max_tokens} is above this server's limit of {args.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    budget = scorer.model.default_budget if request.autoselect is None or request.autoselect.budget is None \
        else request.autoselect.budget
    try:
        validate_budget(budget)
    except ValueError as exc:
        raise APIError(str(exc), param="autoselect.budget", code="invalid_budget") from None

    messages, urls = _hf_messages(request.messages)
    if len(urls) > args.images.max_images:
        raise APIError(f"{len(urls)} images in one request; the limit is {args.images.max_images}",
                       param="messages", code="too_many_images")
    if not urls and args.require_image:
        raise APIError("this endpoint needs at least one image_url part in a user message",
                       param="messages", code="image_required")
    images = [loader.load(url) for url in urls]

    try:
        encoded = backbone.encode(messages, images)
    except ValueError as exc:  # e.g. a literal image placeholder typed into the text
        raise APIError(f"could not encode the prompt: {exc}", param="messages", code="invalid_value") from None
    input_ids = encoded["input_ids"][0]
    # per-token tensors lose their batch axis like input_ids (collate pads them per row)
    example = {"input_ids": input_ids, **{k: v[0] if k in TOKEN_KEYS else v for k, v in encoded.items()
                                          if k not in ("input_ids", "attention_mask")}}

    plan: list[ImagePlan] = []
    if images:
        try:  # the adapter's own count of each image's visual tokens, resolved as the forward will
            plan = scorer.model.plan(encoded, budget)
        except ValueError as exc:
            raise APIError(str(exc), param="autoselect.budget", code="invalid_budget") from None
    temperature = 1.0 if request.temperature is None else request.temperature
    prepared = Prepared(example, len(images), tuple(plan), budget, max_tokens, temperature,
                        1.0 if request.top_p is None else request.top_p, scorer)
    limit = min(args.max_prompt_tokens or backbone.context_length, backbone.context_length - max_tokens)
    if prepared.pruned_length() > limit:
        raise APIError(
            f"the prompt has {prepared.pruned_length()} tokens after pruning; with max_tokens={max_tokens} the "
            f"limit is {limit} (context {backbone.context_length})", param="messages", code="context_length_exceeded")
    return prepared


# ---- generation --------------------------------------------------------------------------
@dataclass
class Job:
    """One request in a batch; ``deltas`` (streaming only) receives text pieces, then None."""

    prepared: Prepared
    deltas: asyncio.Queue | None = None

    def emitter(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None] | None:
        if self.deltas is None:
            return None
        queue = self.deltas
        return lambda text: loop.call_soon_threadsafe(queue.put_nowait, text)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS) or "length"
    completion_tokens: int
    prepared: Prepared
    batch_size: int  # requests that shared this forward pass
    kept: tuple[int, ...]  # each image's K as the model actually selected it (not just as planned)

    @property
    def kept_total(self) -> int:
        return sum(self.kept)

    @property
    def kept_per_image(self) -> int | None:
        """K when every image kept the same (0 without images), else None."""
        return _same(list(self.kept))

    @property
    def prompt_tokens(self) -> int:
        """What the LLM prefilled: the prompt less each image's dropped visual tokens."""
        return self.prepared.pruned_length(list(self.kept))


@dataclass
class IncrementalDecoder:
    """Streamed text that decodes only a short window per token, not the whole answer so far.

    The text-generation-inference scheme: ``tokens[prefix:read]`` is the window whose text was
    already sent; the text that the new tokens add to it is the next piece, held back while it
    ends in U+FFFD (half of a multi-byte character) unless ``final``.
    """

    decode: Callable[[list[int]], str]
    prefix: int = 0
    read: int = 0

    def step(self, tokens: list[int], final: bool = False) -> str:
        before = self.decode(tokens[self.prefix:self.read]) if self.read > self.prefix else ""
        after = self.decode(tokens[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return after[len(before):]


@dataclass
class _Row:
    """One row of a batched ``generate``: its tokens, its own max_tokens, incremental text."""

    decode: Callable[[list[int]], str]
    eos: set[int]
    max_tokens: int
    emit: Callable[[str], None] | None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    streamed: IncrementalDecoder | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.streamed = IncrementalDecoder(self.decode) if self.emit is not None else None

    def add(self, token: int) -> None:
        if self.finish_reason:
            return
        if token in self.eos:
            self.finish_reason = "stop"
            return
        self.tokens.append(token)
        if len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if self.streamed is not None and (piece := self.streamed.step(self.tokens, final)):
            self.emit(piece)

    def text(self) -> str:
        return self.decode(self.tokens)

    def finish(self) -> None:
        self.finish_reason = self.finish_reason or "length"
        self._flush(final=True)


class _BatchStreamer(BaseStreamer):
    """transformers calls ``put`` with the prompt, then with each step's ``[batch]`` new tokens."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows, self.prompt_seen = rows, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(len(self.rows), -1)[:, -1].tolist()):
            row.add(int(token))

    def end(self) -> None:
        pass


def _kept_per_request(jobs: list[Job], selection) -> list[tuple[int, ...]]:
    """Each request's K per image, read off the model's selection (one entry per image, in batch
    order), so usage counts that request's pruned prompt, not the batch's largest K."""
    kept = [len(indices) for indices in selection.per_image()] if selection is not None else []
    per_request, start = [], 0
    for job in jobs:
        count = len(job.prepared.plan)
        own = tuple(kept[start:start + count])
        if len(own) != count:
            raise RuntimeError(f"the model selected for {len(kept)} images; the plan had more")
        start += count
        per_request.append(own)
    if start != len(kept):
        raise RuntimeError(f"the model selected for {len(kept)} images; the plan had {start}")
    return per_request


def generate_group(jobs: list[Job], backbone: Backbone, loop: asyncio.AbstractEventLoop) -> list[Completion]:
    """One left-padded ``generate`` for requests sharing scorer, resolved K and sampling settings."""
    first = jobs[0].prepared
    pad = first.scorer.model.adapter.pad_token_id
    batch = collate([job.prepared.example for job in jobs], pad, padding_side="left")
    batch.pop("labels")
    device = next(backbone.vlm.parameters()).device
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    rows = [_Row(backbone.decode, backbone.eos_token_ids, job.prepared.max_tokens, job.emitter(loop)) for job in jobs]
    sampling = {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p} \
        if first.temperature > 0 else {"do_sample": False}
    model = first.scorer.model
    model.last_selection = None  # this thread is the model's only user (one batch at a time)
    # One requested budget: pass it as asked (the adapter resolves a ratio against each image's
    # own N). Budgets that only resolve to the same K (0.25 and 16 of N=64): pass that K (a group
    # whose K differ per image shares one ratio, `Prepared.batch_budget`).
    asked = {(type(job.prepared.budget), job.prepared.budget) for job in jobs}
    budget = first.budget if len(asked) == 1 else first.batch_budget[1]
    model.generate(
        budget=budget, **batch, **sampling, max_new_tokens=max(r.max_tokens for r in rows),
        pad_token_id=pad, streamer=_BatchStreamer(rows),
    )
    completions = []
    for job, row, kept in zip(jobs, rows, _kept_per_request(jobs, model.last_selection)):
        row.finish()
        completions.append(Completion(row.text(), row.finish_reason, len(row.tokens), job.prepared, len(jobs), kept))
    return completions


def run_batch(jobs: list[Job], backbone: Backbone, loop: asyncio.AbstractEventLoop) -> list[Completion | APIError]:
    """Split a Serve batch into groups that can share a forward pass; a failing group fails alone."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, job in enumerate(jobs):
        groups[job.prepared.group_key].append(index)
    results: list[Completion | APIError] = [None] * len(jobs)  # type: ignore[list-item]
    for indices in groups.values():
        try:
            for index, completion in zip(indices, generate_group([jobs[i] for i in indices], backbone, loop)):
                results[index] = completion
        except Exception as exc:  # one bad group must not take the others (or the replica) down
            logger.exception("generation failed for a group of %d request(s)", len(indices))
            for index in indices:
                results[index] = APIError(f"generation failed: {type(exc).__name__}: {exc}", status=500,
                                          type="server_error", code="generation_failed")
    return results
