"""The methods one evaluation compares: all tokens, AutoSelect and the training-free baselines.

Each is a `Method` with one ``forward(batch, repeats, logits_to_keep)`` that returns the logits
and which visual tokens it kept, so the scoring code is the same for all of them.

``repeats``: a multiple-choice batch holds each image ``repeats`` times in a row (one row per
candidate answer). Pre-LLM pruners (AutoSelect, random, uniform, VisionZip, DivPrune) choose
from the image alone, so they choose ONCE per image and every candidate is scored on the same
kept tokens (`FixedSelection`): a random baseline does not get a fresh draw per candidate.
FastV ranks tokens inside the LLM by the attention of the prompt's last token (``prompt_ends``),
as when it generates the answer, so it too chooses once per question and never reads the answer
it is scoring (a teacher-forced row's own last token would be the end of its candidate answer).

``prefix``: when every row's answer starts at the same column, the rows of a group share their
prompt (image + question) token for token. Full tokens, the pre-LLM pruners and FastV then run each
prompt once, copy its KV cache to the group's rows and run only the candidate answers: the same
numbers as one forward per row (tested), about ``repeats`` times less work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import nn

from autoselect.config import InferenceOptions
from autoselect.model import AutoSelectModel
from autoselect.pruned import PrunedVLM, Selection
from autoselect.pruners import FastV, build_pruner
from pipelines.evaluation.oracle import ORACLE, OraclePruner

FULL = "full"
AUTOSELECT = "autoselect"
# The scorer under another inference decode than its own (`decode_variants`): "autoselect-dpp", ...
# A separate method: the report pairs it with `autoselect` like a baseline, and it is never a
# baseline in the registry tags.
AUTOSELECT_VARIANT = AUTOSELECT + "-"
FASTV_LAYER = 2  # FastV's default cut; capped at the LLM's depth - 1 (the tiny LLM has 2 layers)


@dataclass
class Forward:
    """What a method's forward gives the scorer."""

    logits: torch.Tensor  # [rows, k, vocab]: the LM head on the last k columns the LLM kept
    selection: Selection | None  # kept visual tokens per row's image; None: all tokens
    columns: torch.Tensor | None = None  # the model's own output -> input column map, where it reports one (FastV)


def repeat_selection(selection: Selection, repeats: int) -> Selection:
    """``selection`` for images that each appear ``repeats`` times in a row."""

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.repeat_interleave(repeats, dim=0)

    return Selection(indices=rep(selection.indices), num_tokens=selection.num_tokens, scores=rep(selection.scores), tokens=rep(selection.tokens))


class FixedSelection(PrunedVLM):
    """Runs ``pruner``'s shared pruned path with a selection (and kept tokens) chosen earlier,
    under ``position_policy`` (the evaluation's, whatever the pruner's own default)."""

    def __init__(self, pruner: PrunedVLM, selection: Selection, kept: torch.Tensor, position_policy: str) -> None:
        super().__init__(pruner.vlm, selection.budget, pruner.adapter, position_policy)
        self._fixed = (selection, kept)

    def select(self, budget: int | float | None = None, **image_inputs: Any) -> tuple[Selection, torch.Tensor]:
        return self._fixed


def prompt_rows(batch: dict[str, torch.Tensor], repeats: int, prefix: int) -> dict[str, torch.Tensor]:
    """One row per group: its image and its first ``prefix`` columns (the shared prompt)."""
    rows = {key: value[::repeats] for key, value in batch.items()}
    rows["input_ids"] = rows["input_ids"][:, :prefix]
    rows["attention_mask"] = rows["attention_mask"][:, :prefix]
    return rows


def continue_rows(
    vlm: nn.Module, prompt_out, batch: dict[str, torch.Tensor], repeats: int, prefix: int, logits_to_keep: int,
    original_positions: bool = False,
) -> torch.Tensor:
    """Every row's columns after the prompt, on a copy of its group's prompt KV cache; returns the
    logits of the last ``logits_to_keep`` columns of the (possibly pruned) full sequence.

    The tail's positions continue the prompt's: after its ``past`` cached columns when the pruned
    prompt was re-packed, after its ``prefix`` unpruned columns when kept tokens kept their
    ``original_positions`` (gaps included), as a full forward of the row would number them."""
    cache = prompt_out.past_key_values
    cache.batch_repeat_interleave(repeats)
    past = cache.get_seq_length()
    tail_ids, tail_mask = batch["input_ids"][:, prefix:], batch["attention_mask"][:, prefix:]
    mask = torch.cat([torch.ones(tail_ids.shape[0], past, dtype=tail_mask.dtype, device=tail_mask.device), tail_mask], dim=1)
    start = prefix if original_positions else past
    positions = torch.arange(start, start + tail_ids.shape[1], device=tail_ids.device).expand(tail_ids.shape[0], -1)
    tail = vlm(input_ids=tail_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits
    logits = torch.cat([prompt_out.logits[:, -1:].repeat_interleave(repeats, dim=0), tail], dim=1)
    if logits_to_keep > logits.shape[1]:
        raise ValueError(f"the scored window ({logits_to_keep}) starts inside the shared prompt ({prefix} columns)")
    return logits[:, -logits_to_keep:]


class Method(ABC):
    """``name`` is what the report shows: the pruner (``base``), with its position policy in
    brackets when one run compares both policies (``random[original]``)."""

    own_positions = False  # True: the method fixes its positions itself, so it sits beside every policy

    def __init__(self, name: str, budget_label: str | None, budget: int | float | None, model: nn.Module,
                 position_policy: str | None = None, show_policy: bool = False) -> None:
        self.base, self.budget_label, self.budget, self.model = name, budget_label, budget, model
        self.position_policy = position_policy
        self.name = f"{name}[{position_policy}]" if show_policy and position_policy else name

    @property
    def label(self) -> str:
        return self.name if self.budget_label is None else f"{self.name}@{self.budget_label}"

    def supports(self, task) -> bool:
        """Whether this method can run ``task`` (the oracle needs answer boxes)."""
        return True

    def prepare(self, examples) -> None:
        """Called with a batch's examples before its forward (the oracle reads their boxes)."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor], repeats: int, logits_to_keep: int, prefix: int | None = None,
                prompt_ends: torch.Tensor | None = None) -> Forward:
        """``batch`` without labels; its rows come in groups of ``repeats`` sharing one image (and,
        with ``prefix``, the same first ``prefix`` columns: their prompt). ``prompt_ends [rows]``:
        each row's last column before its answer (what an in-LLM ranking may read)."""

    def kept_indices(self, prompt: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Sorted kept-token indices ``[images, K]`` for a prompt (None: all tokens)."""
        with torch.no_grad():
            self.model(**prompt, budget=self.budget)
        return self.model.last_selection.indices


class FullTokens(Method):
    """The unmodified VLM: the reference every retention is relative to."""

    def __init__(self, vlm: nn.Module) -> None:
        super().__init__(FULL, None, None, vlm)

    def forward(self, batch, repeats, logits_to_keep, prefix=None, prompt_ends=None):
        if prefix is None or repeats == 1:
            return Forward(self.model(**batch, logits_to_keep=logits_to_keep).logits, None)
        prompt = prompt_rows(batch, repeats, prefix)
        out = self.model(**prompt, use_cache=True, logits_to_keep=1)
        return Forward(continue_rows(self.model, out, batch, repeats, prefix, logits_to_keep), None)

    def kept_indices(self, prompt):
        return None


class PreLLM(Method):
    """A `PrunedVLM` (AutoSelect in eval mode or a pre-LLM baseline): one choice per image."""

    model: PrunedVLM

    def forward(self, batch, repeats, logits_to_keep, prefix=None, prompt_ends=None):
        image_inputs, _ = self.model.split_inputs(dict(batch))
        unique = {key: value[::repeats] for key, value in image_inputs.items()}  # one image per row group
        selection, kept = self.model.select(self.budget, **unique)
        repeated = repeat_selection(selection, repeats)
        policy = self.position_policy or self.model.position_policy  # None: the pruner's own
        if prefix is None or repeats == 1 or self.model.adapter.layout_positions:
            replay = FixedSelection(self.model, repeated, kept.repeat_interleave(repeats, dim=0), policy)
            return Forward(replay(**batch, logits_to_keep=logits_to_keep).logits, replay.last_selection)
        out = FixedSelection(self.model, selection, kept, policy)(**prompt_rows(batch, repeats, prefix), use_cache=True, logits_to_keep=1)
        original = policy == "original"
        return Forward(continue_rows(self.model.vlm, out, batch, repeats, prefix, logits_to_keep, original), repeated)


class Oracle(PreLLM):
    """`OraclePruner` on tasks that know where their answers are."""

    model: OraclePruner

    def supports(self, task) -> bool:
        return all(e.boxes for e in task.examples)

    def prepare(self, examples) -> None:
        self.model.prepare(examples)


class InsideLLM(Method):
    """FastV: prunes after LLM layer L; its logits cover the shorter sequence (``last_columns``).
    Its first L layers see every token at its own position and its pruned layers keep those
    positions (FastV's method): it runs under ``original`` whatever the evaluation's policy, and
    is compared with the pre-LLM methods of either policy. It ranks at the prompt's last token,
    as when it generates the answer, never at a token of the answer being scored: with a shared
    prompt, the prompt once and each answer on its pruned cache (`FastV.prefill`), else each
    row whole with ``prompt_ends`` as its ranking columns."""

    model: FastV
    own_positions = True

    def forward(self, batch, repeats, logits_to_keep, prefix=None, prompt_ends=None):
        if prefix is None or repeats == 1:
            out = self.model(**batch, budget=self.budget, rank_columns=prompt_ends, logits_to_keep=logits_to_keep)
            return Forward(out.logits, self.model.last_selection, self.model.last_columns)
        out = self.model.prefill(budget=self.budget, **prompt_rows(batch, repeats, prefix), logits_to_keep=1)
        with self.model.continuing(repeats):
            logits = continue_rows(self.model.vlm, out, batch, repeats, prefix, logits_to_keep, original_positions=True)
        return Forward(logits, repeat_selection(self.model.last_selection, repeats))  # columns: the selection's re-packing


def decode_variants(autoselect: AutoSelectModel, decodes: Sequence[str], dpp_quality_scale: float | None = None,
                    dpp_share: float | None = None) -> dict[str, AutoSelectModel]:
    """``{"autoselect-dpp": model, ...}``: the scorer under each decode of ``decodes`` other than
    its own (`AutoSelectModel.with_inference`, sharing its weights), to compare on validation. The
    variants with a DPP part take ``dpp_quality_scale``, the topk_dpp one ``dpp_share`` (default:
    the scorer's own); a top-K variant keeps the scorer's noise and seed, the others have none
    (they take no noise). A variant equal to the scorer's own options (its grid reserve aside) is
    the scorer itself and is left out."""
    own = autoselect.config.inference
    variants = {}
    for decode in dict.fromkeys(decodes):
        if decode == "topk":
            options = InferenceOptions(noise=own.noise, seed=own.seed) if own.decode == "topk" else InferenceOptions()
        else:
            scale = dpp_quality_scale if dpp_quality_scale is not None else own.dpp_quality_scale
            share = dpp_share if dpp_share is not None else own.dpp_share
            options = InferenceOptions(decode=decode, dpp_quality_scale=scale, **({"dpp_share": share} if decode == "topk_dpp" else {}))
        if options == replace(own, grid_reserve=options.grid_reserve):
            continue
        variants[AUTOSELECT_VARIANT + decode] = autoselect.with_inference(options)
    return variants


def baseline_settings(vlm: nn.Module, seed: int, fastv_layer: int | None) -> dict[str, dict[str, Any]]:
    """Constructor arguments per baseline (recorded in the report); the rest keep their defaults."""
    depth = len(vlm.get_decoder().layers)
    layer = fastv_layer if fastv_layer is not None else min(FASTV_LAYER, depth - 1)
    return {"random": {"seed": seed}, "fastv": {"layer": layer}}


def build_methods(
    vlm: nn.Module,
    pruners: list[str],
    budgets: list[tuple[str, int | float]],
    autoselect: AutoSelectModel | None,
    settings: dict[str, dict[str, Any]],
    policies: Sequence[str] = ("repack",),
    variants: dict[str, AutoSelectModel] | None = None,
) -> list[Method]:
    """Full tokens, then every pruner at every budget under every position policy (the same for
    all, so the comparison is like for like); fresh baseline instances (a random pruner restarts
    its seeded stream), the one AutoSelect model shared across budgets. FastV runs once per
    budget: it has one policy of its own (`InsideLLM`). ``variants`` (`decode_variants`) run
    right after AutoSelect, under their own names."""
    methods: list[Method] = [FullTokens(vlm)]
    both = len(policies) > 1
    variants = variants or {}
    if variants and AUTOSELECT not in pruners:
        raise ValueError(f"decode variants {sorted(variants)} need the autoselect method")
    names = [m for name in pruners for m in ([name, *variants] if name == AUTOSELECT else [name])]
    for name in names:
        for policy in policies if name != "fastv" else ("original",):
            for label, budget in budgets:
                if name in variants:
                    model: nn.Module = variants[name]
                elif name == AUTOSELECT:
                    if autoselect is None:
                        raise ValueError("the autoselect method needs a trained scorer (--autoselect)")
                    model = autoselect
                elif name == ORACLE:
                    model = OraclePruner(vlm, budget).eval()
                else:
                    model = build_pruner(name, vlm, budget, **settings.get(name, {}))
                kind = InsideLLM if isinstance(model, FastV) else Oracle if name == ORACLE else PreLLM
                methods.append(kind(name, label, budget, model, policy, show_policy=both))
    return methods
