"""`AutoSelectConfig`: every knob of the method in one JSON-serialisable dataclass.

Defaults follow the DiffPrune/AutoSelect paper (see docs in ``docs/method.md``):
a 2-block global-attention scorer, a 1-block diagonal-attention denoiser and a cosine
temperature schedule 2.0 -> 0.1 over 2000 steps. The paper's knobs are flat fields; the add-ons
beyond it are grouped, with their dependencies checked: ``training`` (`TrainingOptions`) and
``inference`` (`InferenceOptions`). Configs saved in the older flat form still load
(``RENAMED_KEYS``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

POSITION_POLICIES = ("repack", "original")
DECODES = ("topk", "dpp", "topk_dpp")  # inference.decode: the top-K (default), greedy DPP-MAP, or top-K then DPP
DPP_DECODES = ("dpp", "topk_dpp")  # the decodes with a DPP part (they take dpp_quality_scale)
TRAINING_DECODES = ("inference", "topk")  # training.decode: the straight-through forward keeps inference's set, or the top-K


class ConfigError(ValueError):
    """An `AutoSelectConfig` (or one of its option groups) that cannot be built."""


class UnknownConfigKey(ConfigError):
    """A key no field of the config (or of the nested group it sits in) has."""


class OptionDependencyError(ConfigError):
    """An add-on option set without the option it depends on, or where another makes it moot."""


class LegacyConfigError(ConfigError):
    """An old flat ``config.json`` that cannot be read as the nested form: a non-empty ``extra``,
    or an old flat key given next to the nested key it became."""


@dataclass(frozen=True)
class TrainingOptions:
    """Beyond the paper: how the training forward runs. All off by default (the paper's form);
    inference is unaffected (it runs the scorer and a hard top-K whatever is set here)."""

    # Budget-sampled training: each training batch draws its budget from this list (one scorer
    # that serves all of them); empty: train at `budget`, which stays the inference default.
    budgets: list[int | float] = field(default_factory=list)
    # Noise gate: standardise with per-channel batch statistics so the VP property holds for
    # features that are not unit-variance (the paper assumes "normalized visual tokens").
    gate_standardize: bool = True
    # Also throttle attention, adding log(alpha_i) to every visual column's attention logits, so at
    # low temperature the LLM sees the sequence it sees at inference (only the kept tokens) instead
    # of K clean + N - K noised tokens. Needs one placeholder per scored token (not LLaVA-NeXT's
    # newlines) and a causal LLM mask (not Gemma 3).
    gate_attention: bool = False
    # Needs gate_attention: the training forward keeps the set inference's decode keeps (the hard
    # top-K, or the DPP / grid reserve `inference` names; kept tokens clean and fully attended, the
    # rest throttled to `STRAIGHT_THROUGH_FLOOR`), while the backward
    # goes through the soft top-K weights (straight-through estimator). A dropped token's gradient is
    # then the first-order value of letting it back in *given the kept set*, so a redundant token
    # earns nothing. No noise gate and no denoiser: the model builds and saves none.
    straight_through: bool = False
    # Only with straight_through: "inference" keeps the set inference's decode keeps (above);
    # "topk" keeps the hard top-K whatever inference decodes, for a scorer trained under top-K and
    # read under another decode (chosen on validation), so retraining its recipe trains what was read.
    decode: str = "inference"
    # For a cheap step: 0 sends the LLM all N (gated) tokens. c > 0 sends only the scorer's hard
    # top-K plus round(c * K) others drawn at random from the rest, each still gated by its
    # retention weight, so the LLM's cost follows K (1 + c), not N. The tokens left out still get
    # gradient through the soft top-K's sum-to-K threshold; the drawn ones give the scorer
    # first-hand evidence about tokens outside its current choice.
    candidates: float = 0.0
    # Gumbel noise of this scale on the logits before the soft top-K, annealed to 0 with the
    # temperature schedule. Tied or shrunken logits then give a hard random choice at low
    # temperature instead of weights spread over many tokens, so the scorer must separate the
    # tokens it wants; training ends on the deterministic top-K inference uses.
    score_noise: float = 0.0
    # False (needs score_noise > 0): keep `score_noise` constant instead, training a selection
    # *policy* to sample from at inference (`inference.noise` at the same scale) rather than a
    # ranking to take the top-K of.
    score_noise_anneal: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", list(self.budgets))
        for budget in self.budgets:
            validate_budget(budget)
        for name in ("score_noise", "candidates"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.straight_through and not self.gate_attention:
            raise OptionDependencyError(
                "training.straight_through needs training.gate_attention=True (it drops tokens by throttling attention)")
        if self.straight_through and not self.gate_standardize:
            raise OptionDependencyError(
                "training.gate_standardize=False has no effect with training.straight_through (no noise gate runs)")
        if self.decode not in TRAINING_DECODES:
            raise ConfigError(f"training.decode must be one of {TRAINING_DECODES}, got {self.decode!r}")
        if self.decode != "inference" and not self.straight_through:
            raise OptionDependencyError(
                f"training.decode={self.decode!r} needs training.straight_through=True (otherwise training keeps the soft top-K's set)")
        if not self.score_noise_anneal and not self.score_noise:
            raise OptionDependencyError(
                "training.score_noise_anneal=False needs training.score_noise > 0 (there is no noise to keep constant)")

    @property
    def uses_denoiser(self) -> bool:
        """Whether the training forward runs the noise gate and denoiser (not with straight_through)."""
        return not self.straight_through


@dataclass(frozen=True)
class InferenceOptions:
    """Beyond the paper: how inference turns the scorer's logits into the K kept tokens.

    ``decode="topk"`` (the default, the paper's): the top K of ``logits + noise * g`` where g is one
    fixed Gumbel vector per token position (drawn from ``seed``), i.e. a seeded sample of the
    scorer's selection policy rather than its mode; ``noise = 0`` is the paper's hard top-K.
    Deterministic, and the same for an image alone or in a batch. Pairs with
    ``training.score_noise``: a scorer trained at a constant noise scale is trained to be sampled
    from at that scale.

    ``decode="dpp"``: a quality-weighted diversity decode, greedy DPP-MAP over the kernel
    ``diag(q) S diag(q)``, S the cosine similarity of the pre-projector visual features and
    ``q = exp(dpp_quality_scale * z)``, z the image's standardised logits (see
    `autoselect.selection.dpp_indices`). Deterministic; takes no noise. Chosen over top-K only
    where it wins on validation.

    ``decode="topk_dpp"``: the top ``K - floor(dpp_share * K)`` by the logits, then the DPP
    conditioned on them for the last ``floor(dpp_share * K)`` (`autoselect.selection.topk_dpp_indices`):
    the tokens the scorer is surest of, then what they do not cover. Share 0 is the top-K, 1 the DPP.
    With ``dpp_head_quality_scale`` the head is itself the greedy DPP at that (larger) scale: where
    the logits peak it is the top-K, where they are flat it spreads."""

    noise: float = 0.0
    seed: int = 0  # only with noise > 0
    decode: str = "topk"
    # Only with decode="dpp" or "topk_dpp": theta in q = exp(theta * z). Larger follows the logits more (the
    # top-K as theta -> inf), smaller favours diversity (0 would ignore the scorer).
    dpp_quality_scale: float = 1.0
    # Only with decode="topk_dpp": the share of K the DPP picks after the top-K (rounded down).
    dpp_share: float = 0.5
    # Only with decode="topk_dpp": the head (K minus the DPP's share) is the greedy DPP at this quality
    # scale, not the top-K (None, the default; the top-K is the limit of a large scale).
    dpp_head_quality_scale: float | None = None
    # Beyond the paper: this share of K (rounded) is an even grid over a square patch grid (the
    # uniform baseline's lattice), the rest is the decode's choice among the other tokens, so the
    # kept set always covers the image and the scorer spends the rest where it ranks highest.
    grid_reserve: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.grid_reserve <= 1.0:
            raise ConfigError(f"inference.grid_reserve must be in [0, 1], got {self.grid_reserve}")
        if not self.noise >= 0:
            raise ConfigError(f"inference.noise must be >= 0, got {self.noise}")
        if self.seed != 0 and not self.noise:
            raise OptionDependencyError(f"inference.seed={self.seed} needs inference.noise > 0 (the top-K uses no seed)")
        if self.decode not in DECODES:
            raise ConfigError(f"inference.decode must be one of {DECODES}, got {self.decode!r}")
        if not (self.dpp_quality_scale > 0 and math.isfinite(self.dpp_quality_scale)):
            raise ConfigError(f"inference.dpp_quality_scale must be a finite number > 0, got {self.dpp_quality_scale}")
        if self.decode != "topk" and self.noise:
            raise OptionDependencyError(
                f"inference.noise={self.noise} needs inference.decode='topk' (the {self.decode} decode is deterministic and takes no noise)")
        if self.dpp_quality_scale != 1.0 and self.decode not in DPP_DECODES:
            raise OptionDependencyError(
                f"inference.dpp_quality_scale={self.dpp_quality_scale} needs inference.decode in {DPP_DECODES} (the top-K has no quality scale)")
        if not 0.0 <= self.dpp_share <= 1.0:
            raise ConfigError(f"inference.dpp_share must be in [0, 1], got {self.dpp_share}")
        if self.dpp_share != 0.5 and self.decode != "topk_dpp":
            raise OptionDependencyError(
                f"inference.dpp_share={self.dpp_share} needs inference.decode='topk_dpp' (the only decode that splits K)")
        head = self.dpp_head_quality_scale
        if head is not None and not (isinstance(head, (int, float)) and head > 0 and math.isfinite(head)):
            raise ConfigError(f"inference.dpp_head_quality_scale must be a finite number > 0 or None, got {head!r}")
        if head is not None and self.decode != "topk_dpp":
            raise OptionDependencyError(
                f"inference.dpp_head_quality_scale={head} needs inference.decode='topk_dpp' (the only decode with a head)")


GROUPS = {"training": TrainingOptions, "inference": InferenceOptions}

# The flat keys of configs saved before the option groups, and where each one lives now.
RENAMED_KEYS = {
    "train_budgets": "training.budgets",
    "gate_standardize": "training.gate_standardize",
    "gate_attention": "training.gate_attention",
    "straight_through": "training.straight_through",
    "train_candidates": "training.candidates",
    "score_noise": "training.score_noise",
    "score_noise_anneal": "training.score_noise_anneal",
    "inference_noise": "inference.noise",
    "inference_seed": "inference.seed",
}


@dataclass
class AutoSelectConfig:
    """Configuration of the scorer, denoiser, budget and schedules.

    ``budget`` is either an ``int`` K (visual tokens kept per image) or a ``float`` ratio
    in (0, 1] of the N visual tokens an image has. The paper's knobs are flat; the add-ons beyond
    it sit in ``training`` (`TrainingOptions`) and ``inference`` (`InferenceOptions`).
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = RENAMED_KEYS

    budget: int | float = 64
    # Scorer: transformer blocks with global attention over the visual tokens + linear head.
    scorer_layers: int = 2
    scorer_width: int | None = None  # None: the backbone's vision feature width
    scorer_heads: int | None = None  # None: width // 64 (at least 1), as in the paper (1024 / 16)
    scorer_mlp_ratio: float = 4.0
    # Denoiser: transformer blocks whose attention sees only the token itself (identity mask).
    # Train-only, and not built with training.straight_through.
    denoiser_layers: int = 1
    denoiser_mlp_ratio: float = 4.0
    dropout: float = 0.0
    # Budgeted soft top-K temperature: cosine from start to end over `temperature_steps`.
    temperature_start: float = 2.0
    temperature_end: float = 0.1
    temperature_steps: int = 2000
    # Position ids of kept tokens at inference: "repack" (contiguous) or "original" (with gaps).
    position_policy: str = "repack"
    training: TrainingOptions = field(default_factory=TrainingOptions)
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    # Filled in by `AutoSelectModel.attach` so a saved scorer can be checked against a VLM.
    vision_width: int | None = None
    backbone: str | None = None

    def __post_init__(self) -> None:
        validate_budget(self.budget)
        for name, group in GROUPS.items():
            if not isinstance(getattr(self, name), group):
                raise ConfigError(f"{name} must be a {group.__name__}, got {getattr(self, name)!r}")
        if self.position_policy not in POSITION_POLICIES:
            raise ValueError(
                f"position_policy must be one of {POSITION_POLICIES}, got {self.position_policy!r}"
            )
        for name in ("scorer_layers", "denoiser_layers", "temperature_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.temperature_start > 0 and self.temperature_end > 0):
            raise ValueError("temperature_start and temperature_end must be > 0")
        if self.scorer_width is not None and self.scorer_width < 1:
            raise ValueError(f"scorer_width must be >= 1, got {self.scorer_width}")

    # ---- budget -------------------------------------------------------------------------
    def resolve_budget(self, num_tokens: int, budget: int | float | None = None) -> int:
        """Number of tokens K to keep out of ``num_tokens`` (N) for ``budget`` (default: ours)."""
        return resolve_budget(self.budget if budget is None else budget, num_tokens)

    # ---- schedules ----------------------------------------------------------------------
    def temperature(self, step: int) -> float:
        """Cosine-annealed soft top-K temperature at optimiser step ``step``."""
        return self.temperature_end + (self.temperature_start - self.temperature_end) * self._cosine(step)

    def noise_scale(self, step: int) -> float:
        """Gumbel noise scale on the logits at ``step``: ``training.score_noise``, annealed to 0
        like the temperature unless ``training.score_noise_anneal`` is off."""
        scale = self.training.score_noise
        return scale * (self._cosine(step) if self.training.score_noise_anneal else 1.0)

    def _cosine(self, step: int) -> float:
        progress = min(max(step, 0), self.temperature_steps) / self.temperature_steps
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def resolved_heads(self, width: int) -> int:
        heads = self.scorer_heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"scorer width {width} is not divisible by scorer_heads={heads}")
        return heads

    # ---- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AutoSelectConfig":
        """The nested form ``to_dict`` writes, or the flat form saved before the option groups
        (``RENAMED_KEYS``; an old ``extra`` is accepted only if empty). Unknown keys are errors."""
        data = upgrade_flat_keys(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UnknownConfigKey(f"unknown AutoSelectConfig keys: {unknown}")
        values = dict(data)
        for name, group in GROUPS.items():
            if name not in values:
                continue
            nested = values[name]
            if not isinstance(nested, dict):
                raise ConfigError(f"{name} must be a mapping of {group.__name__} keys, got {nested!r}")
            unknown = sorted(set(nested) - {f.name for f in dataclasses.fields(group)})
            if unknown:
                raise UnknownConfigKey(f"unknown AutoSelectConfig {name} keys: {unknown}")
            values[name] = group(**nested)
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_string(cls, text: str) -> "AutoSelectConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "AutoSelectConfig":
        return cls.from_json_string(Path(path).read_text())


def upgrade_flat_keys(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the flat keys of an older config moved to their nested places (a copy)."""
    data = {key: dict(value) if key in GROUPS and isinstance(value, dict) else value for key, value in data.items()}
    extra = data.pop("extra", None)
    if extra:
        raise LegacyConfigError(f"extra was never read and is gone; this config's non-empty extra would be lost: {extra!r}")
    for old, new in RENAMED_KEYS.items():
        if old not in data:
            continue
        group, key = new.split(".")
        nested = data.setdefault(group, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{group} must be a mapping, got {nested!r}")
        if key in nested:
            raise LegacyConfigError(f"{old} (the old flat name) and {new} are both given")
        nested[key] = data.pop(old)
    return data


@dataclass(frozen=True)
class ScoreMass:
    """Adaptive budget: per image, the fewest top-scored tokens whose share of the softmax score
    mass reaches ``share`` (at least ``min_tokens``). Only a scorer can resolve it (AutoSelect)."""

    share: float
    min_tokens: int = 1

    def __post_init__(self) -> None:
        if not (0.0 < self.share <= 1.0) or math.isnan(self.share):
            raise ValueError(f"ScoreMass share must be in (0, 1], got {self.share}")
        if self.min_tokens < 1:
            raise ValueError(f"ScoreMass min_tokens must be >= 1, got {self.min_tokens}")


def validate_budget(budget: int | float | ScoreMass) -> None:
    """Reject budgets that can never be valid, whatever N is."""
    if isinstance(budget, ScoreMass):
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int K or a float ratio in (0, 1], got {budget!r}")
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    elif not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise ValueError(f"budget ratio must be in (0, 1], got {budget}")


def resolve_budget(budget: int | float, num_tokens: int) -> int:
    """Turn an int K or a ratio into K for an image with ``num_tokens`` visual tokens."""
    validate_budget(budget)
    if isinstance(budget, ScoreMass):
        raise ValueError("a ScoreMass budget depends on the scores: only AutoSelect (a trained scorer) can use it")
    if isinstance(budget, float):
        return max(1, min(num_tokens, round(budget * num_tokens)))
    if budget > num_tokens:
        raise ValueError(f"budget K={budget} exceeds the {num_tokens} visual tokens of the image")
    return budget
