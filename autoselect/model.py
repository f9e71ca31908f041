"""`AutoSelectModel`: a frozen VLM with a trainable scorer (and train-only denoiser) attached.

Train mode:  visual tokens -> scorer -> soft top-K (sum = K) -> VP noise gate -> denoiser
             -> frozen projector -> frozen LLM; the loss is the VLM's own next-token loss.
             (With ``training.straight_through``: no gate and no denoiser, see `TrainingOptions`.)
Eval mode:   visual tokens -> scorer -> hard top-K (order kept) -> frozen projector on the K kept
             tokens -> frozen LLM (the shared `PrunedVLM` path). ``inference.decode="dpp"``
             keeps a logit-weighted diverse set instead (greedy DPP-MAP, `dpp_indices`).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from autoselect.backbones import BackboneAdapter, get_adapter
from autoselect.checkpointing import checkpoint_layers, decoder_layers, is_checkpointed
from autoselect.config import AutoSelectConfig, InferenceOptions, ScoreMass
from autoselect.decode import kept_indices
from autoselect.denoiser import Denoiser
from autoselect.gate import straight_through_kept, throttled_attention_mask, vp_noise_gate
from autoselect.pruned import PrunedVLM, Selection
from autoselect.scorer import Scorer
from autoselect.selection import (
    candidate_indices,
    gather_tokens,
    mass_budget,
    pad_tokens,
    topk_mask,
)
from autoselect.soft_topk import soft_topk

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def build_scorer(config: AutoSelectConfig, vision_width: int) -> Scorer:
    width = config.scorer_width or vision_width
    return Scorer(
        vision_width=vision_width,
        width=width,
        layers=config.scorer_layers,
        heads=config.resolved_heads(width),
        mlp_ratio=config.scorer_mlp_ratio,
        dropout=config.dropout,
    )


def load_scorer(directory: str | Path) -> tuple[Scorer, AutoSelectConfig]:
    """The scorer alone from a ``save_pretrained`` folder (no VLM needed), in eval mode."""
    directory = Path(directory)
    config = AutoSelectConfig.load(directory / CONFIG_NAME)
    if config.vision_width is None:
        raise ValueError(f"{directory / CONFIG_NAME} has no vision_width; save it with AutoSelectModel.save_pretrained")
    scorer = build_scorer(config, config.vision_width)
    prefix = "scorer."
    state = {k[len(prefix):]: v for k, v in load_file(str(directory / WEIGHTS_NAME)).items() if k.startswith(prefix)}
    scorer.load_state_dict(state, strict=True)
    return scorer.eval(), config



def vlm_dtype_name(vlm: nn.Module) -> str:
    """``"float32"``, ``"bfloat16"``, ...: the frozen VLM's dtype as a save records it."""
    return str(next(vlm.parameters()).dtype).removeprefix("torch.")

class AutoSelectModel(PrunedVLM):
    """Wraps one VLM instance; only ``scorer`` and ``denoiser`` have trainable parameters.

    ``denoiser`` is None when the training form uses none (``training.straight_through``)."""

    def __init__(self, vlm: nn.Module, config: AutoSelectConfig, adapter: BackboneAdapter) -> None:
        super().__init__(vlm, config.budget, adapter, config.position_policy)
        self.config = config
        self.scorer = build_scorer(config, adapter.vision_width)
        self.denoiser = (Denoiser(adapter.vision_width, config.denoiser_layers, config.denoiser_mlp_ratio, config.dropout)
                         if config.training.uses_denoiser else None)
        self.training_step = 0
        # False after loading an inference-only save of a form that trains a denoiser: it can
        # prune, not train (a straight-through scorer needs none, so it always can).
        self.can_train = True
        self.trained_vlm_dtype: str | None = None  # the frozen VLM's dtype when the scorer was (last) trained
        # float32 whatever the VLM's dtype: bf16 logits are so coarse that most tokens tie (and the
        # soft top-K then spreads the budget evenly over them), and bf16 weights lose small updates.
        device = next(vlm.parameters()).device
        self.trainable_modules().to(device=device, dtype=torch.float32)

    # The config is the single source of truth for the budget and position policy.
    @property
    def default_budget(self) -> int | float:
        return self.config.budget

    @property
    def position_policy(self) -> str:
        return self.config.position_policy

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def attach(cls, vlm: nn.Module, config: AutoSelectConfig | None = None) -> "AutoSelectModel":
        """Freeze ``vlm`` and attach a fresh scorer (and denoiser) sized for its vision tokens.
        ``config`` is copied, never changed: the model's own copy records the VLM's width and class."""
        config = copy.deepcopy(config) if config is not None else AutoSelectConfig()
        adapter = get_adapter(vlm)
        config.vision_width = adapter.vision_width
        config.backbone = type(vlm).__name__
        vlm.requires_grad_(False)
        vlm.eval()
        return cls(vlm, config, adapter)

    @classmethod
    def from_pretrained(cls, directory: str | Path, vlm: nn.Module) -> "AutoSelectModel":
        """Load a scorer/denoiser saved by ``save_pretrained`` onto ``vlm``."""
        directory = Path(directory)
        config = AutoSelectConfig.load(directory / CONFIG_NAME)
        adapter = get_adapter(vlm)
        if config.vision_width is not None and config.vision_width != adapter.vision_width:
            raise ValueError(
                f"the saved AutoSelect scorer expects visual tokens of width {config.vision_width} "
                f"(trained on {config.backbone}), but this {type(vlm).__name__} produces width "
                f"{adapter.vision_width}"
            )
        model = cls.attach(vlm, config)
        weights = directory / WEIGHTS_NAME
        with safe_open(str(weights), framework="pt", device=str(next(vlm.parameters()).device)) as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}
        inference_only = metadata.get("inference_only") == "true"
        model.trained_vlm_dtype = metadata.get("vlm_dtype")  # None: saved before it was recorded
        running = vlm_dtype_name(vlm)
        if model.trained_vlm_dtype not in (None, running):
            warnings.warn(f"the AutoSelect scorer in {directory} was trained over a {model.trained_vlm_dtype} VLM "
                          f"and now runs over a {running} one: its scores may differ from those it was "
                          "validated with", stacklevel=2)
        if model.denoiser is None:  # older straight-through saves hold a denoiser it never used
            state = {k: v for k, v in state.items() if not k.startswith("denoiser.")}
        if inference_only and model.denoiser is not None:  # the scorer alone: what inference runs (see save_pretrained)
            model.scorer.load_state_dict({k.removeprefix("scorer."): v for k, v in state.items()}, strict=True)
            model.can_train = False
        else:
            model.trainable_modules().load_state_dict(state, strict=True)
        return model

    def with_inference(self, options: InferenceOptions) -> "AutoSelectModel":
        """This model under other inference options (e.g. another ``decode``), sharing the VLM, the
        scorer and the denoiser: for comparing decodes of one scorer on the same batches. Only the
        config (a copy) and ``last_selection`` are its own; this model is unchanged."""
        other = copy.copy(self)
        other.config = dataclasses.replace(self.config, inference=options)
        other.last_selection = None
        return other

    @property
    def has_trained_denoiser(self) -> bool:
        """A denoiser that training built or a full save restored (never one of a straight-through
        form, which has none, nor the fresh one of an inference-only load, which has none either)."""
        return self.denoiser is not None and self.can_train

    def trainable_modules(self) -> nn.ModuleDict:
        """The scorer, and the denoiser where the training form has one."""
        modules = {"scorer": self.scorer} if self.denoiser is None else {"scorer": self.scorer, "denoiser": self.denoiser}
        return nn.ModuleDict(modules)

    def save_pretrained(self, directory: str | Path, inference_only: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` holding only scorer + denoiser (never the
        VLM). ``inference_only``: the scorer alone, all that inference runs (the denoiser is
        train-only; ~30 % of the weights on the mini-LLaVA); such a save cannot resume training.
        A straight-through model has no denoiser: its saves hold the scorer alone and can resume."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # never save a fresh denoiser as trained; a form without one loses nothing, so it can resume
        inference_only = (inference_only or not self.can_train) and self.denoiser is not None
        self.config.save(directory / CONFIG_NAME)
        modules = nn.ModuleDict({"scorer": self.scorer}) if inference_only else self.trainable_modules()
        state = {k: v.detach().contiguous().cpu() for k, v in modules.state_dict().items()}
        # the VLM the weights were trained over: a loaded scorer re-saved from another dtype keeps its own
        trained_over = self.trained_vlm_dtype or vlm_dtype_name(self.vlm)
        metadata = {"format": "pt", "backbone": str(self.config.backbone), "inference_only": str(inference_only).lower(),
                    "vlm_dtype": trained_over}
        save_file(state, str(directory / WEIGHTS_NAME), metadata=metadata)
        return directory

    # ---- nn.Module plumbing -------------------------------------------------------------
    def train(self, mode: bool = True) -> "AutoSelectModel":
        """Scorer/denoiser follow ``mode``; the frozen VLM always stays in eval mode."""
        self.training = mode
        self.trainable_modules().train(mode)
        self.vlm.eval()
        return self

    def enable_gradient_checkpointing(self, enable: bool = True) -> "AutoSelectModel":
        """Checkpoint the frozen LLM's decoder layers in training (``enable=False``: stop): each layer
        keeps only its input and is recomputed in the backward pass, trading about one more LLM
        forward per step for its activations. The loss and the scorer's gradients are unchanged; the
        VLM stays in eval mode and no-grad inference is untouched (see `autoselect.checkpointing`)."""
        checkpoint_layers(self.vlm.get_decoder(), enable)
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the LLM's decoder layers are checkpointed (`enable_gradient_checkpointing`)."""
        return any(is_checkpointed(layer) for layer in decoder_layers(self.vlm.get_decoder()))

    def set_training_step(self, step: int) -> None:
        """Tell the model the optimiser step, which drives the temperature schedule; from now on
        its weights are trained over this VLM, whose dtype ``save_pretrained`` records."""
        self.training_step = int(step)
        self.trained_vlm_dtype = vlm_dtype_name(self.vlm)

    @property
    def temperature(self) -> float:
        return self.config.temperature(self.training_step)

    def num_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.num_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ---- the method ---------------------------------------------------------------------
    def score(self, **image_inputs: Any) -> torch.Tensor | list[torch.Tensor]:
        """Scorer logits ``[num_images, N]`` (one ``[N_i]`` per image when N varies; no gradient
        outside training)."""
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            tokens = self.visual_tokens(**image_inputs)
            if isinstance(tokens, list):
                return [self.scorer(t[None])[0] for t in tokens]
            return self.scorer(tokens)

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        scores = self.scorer(tokens)
        return Selection(indices=self.decode(scores, tokens, k), num_tokens=tokens.shape[1], scores=scores)

    def decode(self, scores: torch.Tensor, tokens: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` kept indices ``[num_images, k]`` (sorted) as ``config.inference`` says
        (`autoselect.decode.kept_indices`: top-K, DPP, grid reserve)."""
        return kept_indices(scores, tokens, k, self.config.inference)

    def select(self, budget=None, **image_inputs: Any):
        """As `PrunedVLM.select`; a `ScoreMass` budget picks K per image from the scores."""
        budget = self.default_budget if budget is None else budget
        if not isinstance(budget, ScoreMass):
            return super().select(budget, **image_inputs)
        tokens = self.visual_tokens(**image_inputs)
        per_image = tokens if isinstance(tokens, list) else list(tokens)
        selections = []
        with torch.no_grad():
            for t in per_image:
                scores = self.scorer(t[None])
                k = mass_budget(scores[0], budget.share, budget.min_tokens)
                selections.append(Selection(indices=self.decode(scores, t[None], k), num_tokens=len(t), scores=scores))
        selection = Selection.concat(selections)
        return selection, selection.kept_tokens(per_image)

    def training_budget(self, budget: int | float | None) -> int | float | None:
        """The budget of a training batch: the caller's, else one drawn from ``training.budgets``."""
        if budget is not None or not self.config.training.budgets:
            return budget
        choices = self.config.training.budgets
        self._last_budget = choices[int(torch.randint(len(choices), ()))]
        return self._last_budget

    def training_scores(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Scorer logits ``[B, N]`` plus the annealed Gumbel noise of ``training.score_noise``."""
        scores = self.scorer(tokens, valid)
        noise = self.config.noise_scale(self.training_step)
        if noise > 0:
            uniform = torch.rand_like(scores).clamp(1e-12, 1 - 1e-12)
            scores = scores - noise * torch.log(-torch.log(uniform))  # Gumbel(0, noise)
        return scores

    def retention_weights(self, tokens: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Soft top-K weights ``[B, N]`` (each row sums to its K) at the current temperature."""
        return soft_topk(self.training_scores(tokens, valid), k, temperature=self.temperature, valid=valid)

    def _train_inputs(self, image_inputs: dict[str, Any], text: dict[str, Any], budget) -> dict[str, Any]:
        """All N tokens of every image, gated by their retention weights and restored by the denoiser
        (or, with ``training.straight_through``, clean and throttled to the hard top-K)."""
        tokens = self.visual_tokens(**image_inputs)
        ragged = isinstance(tokens, list)
        counts = [len(t) for t in tokens] if ragged else [tokens.shape[1]] * tokens.shape[0]
        padded, valid = pad_tokens(tokens) if ragged else (tokens, None)
        k = torch.tensor([self.resolve_budget(n, budget) for n in counts], device=padded.device)
        scores = self.training_scores(padded, valid)
        alpha = soft_topk(scores, k, temperature=self.temperature, valid=valid)
        self._last_alpha = (alpha if valid is None else alpha[valid]).detach()  # the soft weights, for the stats
        form = self.config.training
        kept = self.training_kept(scores, padded, k, valid)
        if form.straight_through:
            alpha = straight_through_kept(alpha, kept)
            restored = padded
        else:
            gated = vp_noise_gate(padded.float(), alpha, standardize=form.gate_standardize, valid=valid)
            # The denoiser corrects a token in proportion to the noise it holds (1 - alpha): a kept
            # token (alpha = 1) reaches the projector exactly as at inference, where the denoiser is
            # gone. Uncorrected, it learned to rewrite kept tokens into a form only training sees.
            correction = (1.0 - alpha).unsqueeze(-1) * (self.denoiser(gated) - gated)
            restored = (gated + correction).to(padded.dtype)  # back to the frozen projector's dtype
        sent = self.sent_tokens(kept, k, counts, valid)
        real_alpha = torch.cat([a[i] for a, i in zip(alpha, sent)])  # of the tokens the LLM sees, in order
        if ragged or len({len(i) for i in sent}) > 1:
            selection = Selection(indices=sent, num_tokens=counts)
            restored = [r[i] for r, i in zip(restored, sent)]
        else:
            selection = Selection(torch.stack(sent), counts[0])
            restored = gather_tokens(restored, selection.indices) if form.candidates else restored
        inputs = self.language_inputs(dict(text), image_inputs, selection, self.project(restored), for_generation=False)
        if form.gate_attention:
            if "token_type_ids" in inputs:
                raise ValueError(f"training.gate_attention needs a causal LLM mask; {self.config.backbone} attends within images bidirectionally")
            dtype = next(self.vlm.parameters()).dtype
            inputs["attention_mask"] = throttled_attention_mask(
                inputs["input_ids"], inputs.get("attention_mask"), self.adapter.image_token_id, real_alpha.flatten(), dtype
            )
        return inputs

    def training_kept(self, scores: torch.Tensor, tokens: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``[B, N]`` bool: the tokens the training forward keeps from these (noisy) logits. With
        ``training.straight_through`` inference's own decode (``config.inference``: top-K, DPP,
        grid reserve; its seeded ``noise`` aside, training draws its own), so a scorer is trained
        under the decode it is read with, unless ``training.decode="topk"``; otherwise the top-K."""
        options, training = self.config.inference, self.config.training
        plain = training.decode == "topk" or (options.decode == "topk" and not options.grid_reserve)
        if not training.straight_through or plain:
            return topk_mask(scores, k, valid)
        options = dataclasses.replace(options, noise=0.0)
        kept = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        real = torch.ones_like(kept) if valid is None else valid.bool()
        for row, (logits, features, keep, mask) in enumerate(zip(scores.detach(), tokens.detach(), k.tolist(), real)):
            index = mask.nonzero()[:, 0]
            kept[row, index[kept_indices(logits[index][None], features[index][None], keep, options)[0]]] = True
        return kept

    def sent_tokens(self, kept: torch.Tensor, k: torch.Tensor, counts: list[int], valid: torch.Tensor | None) -> list[torch.Tensor]:
        """The tokens of each image the LLM sees in training: all N, or with ``training.candidates``
        the ``kept`` ones (`training_kept`) plus a random draw of the rest."""
        if not self.config.training.candidates:
            return [torch.arange(n, device=kept.device) for n in counts]
        extra = (k.double() * self.config.training.candidates).round().long()
        return candidate_indices(kept, extra, valid)

    def forward(self, budget: int | float | None = None, **inputs: Any):
        """Train mode: soft, gated path (needs ``labels`` for a loss). Eval mode: hard top-K."""
        if not self.training:
            return super().forward(budget=budget, **inputs)
        if not self.can_train:
            raise ValueError("this scorer was saved with inference_only=True (no denoiser): it can prune, "
                             "not train; load a full save_pretrained folder to continue training")
        image_inputs, text = self.split_inputs(dict(inputs))
        if not image_inputs:
            return self.vlm(**text)
        return self.vlm(**self._train_inputs(image_inputs, text, self.training_budget(budget)))

    # ---- diagnostics for logging --------------------------------------------------------
    def retention_stats(self) -> dict[str, float]:
        """Mean and mean binary entropy (nats) of the last training step's retention weights."""
        alpha = getattr(self, "_last_alpha", None)
        if alpha is None:
            return {}
        a = alpha.float().clamp(1e-6, 1 - 1e-6)
        entropy = -(a * a.log() + (1 - a) * (1 - a).log()).mean()
        stats = {"alpha_mean": float(alpha.float().mean()), "alpha_entropy": float(entropy), "temperature": self.temperature}
        if self.config.training.budgets:
            stats["budget"] = float(getattr(self, "_last_budget", self.config.budget))
        return stats
