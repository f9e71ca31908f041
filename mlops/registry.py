"""MLflow glue: tracking set-up, the scorer as a pyfunc model, registration with tags, and the
evaluation written back to the version it scored (``tag_target`` + ``tag_evaluation``).

MLflow's transformers flavour does not support transformers 5, and the frozen VLM is not ours
to ship, so the registered model is a small custom pyfunc that holds only the AutoSelect folder
(``config.json`` + ``model.safetensors``). ``predict`` ranks visual tokens, or with
``params={"k": K}`` returns the K it keeps; serving and
evaluation load the folder onto their VLM with ``mlops.backbone.load_registered``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

ARTIFACT_KEY = "autoselect"
MODEL_NAME_IN_RUN = "scorer"
# what loading and calling the pyfunc imports: this package (its `autoselect` modules) and below it
SCORER_DISTRIBUTIONS = ("autoselect", "torch", "transformers", "safetensors", "numpy", "cloudpickle", "mlflow")


def scorer_requirements() -> list[str]:
    """The registered model's pip requirements, pinned to what is installed here (public versions:
    ``2.13.0+cpu`` is recorded as ``2.13.0``). Written out rather than inferred: MLflow's inference
    loads the model in a subprocess (about 10 s of every registration) and its guess left out torch."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SCORER_DISTRIBUTIONS]


class AutoSelectScorerModel(mlflow.pyfunc.PythonModel):
    """Scores visual tokens ``[images, N, vision_width]``. With ``params={"k": K}``: the K kept
    indices ``[images, K]`` (sorted, int64), exactly what ``AutoSelectModel`` keeps
    (`autoselect.decode.kept_indices`: top-K, DPP, top-K then DPP, grid reserve). Without ``k``: ``[images, N]``
    values whose top K is that choice for every K (the logits, plus the seeded Gumbel vector of a
    scorer with ``inference.noise``; with ``decode="dpp"``, N minus each token's greedy pick
    position), refused for a grid-reserve or top-K-then-DPP scorer, whose choice splits K differently
    at every K."""

    def load_context(self, context) -> None:
        from autoselect.model import load_scorer

        self.scorer, self.config = load_scorer(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import torch

        from autoselect.decode import kept_indices, ranking
        from autoselect.selection import dpp_ranking

        tokens = np.asarray(model_input["visual_tokens"] if isinstance(model_input, dict) else model_input, dtype=np.float32)
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.vision_width:
            raise ValueError(
                f"visual_tokens must have shape [images, N, {self.config.vision_width}], got {list(tokens.shape)}"
            )
        k = int((params or {}).get("k") or 0)
        if k < 0 or k > tokens.shape[1]:
            raise ValueError(f"params k={k} must be between 1 and the {tokens.shape[1]} visual tokens (0 or absent: a ranking)")
        options = self.config.inference
        with torch.no_grad():
            features = torch.from_numpy(tokens)
            scores = self.scorer(features)
            if k:
                return kept_indices(scores, features, k, options).numpy()
            if options.grid_reserve:
                raise ValueError(f"this scorer keeps an even grid of {options.grid_reserve} of K first "
                                 "(inference.grid_reserve), a different grid at every K, so no one ranking gives its choice "
                                 'for every K: pass params={"k": K} for the K kept indices')
            if options.decode == "topk_dpp":
                raise ValueError(f"this scorer keeps the top K - floor({options.dpp_share} K) first and the DPP picks the rest "
                                 "(inference.decode='topk_dpp'), a different split at every K, so no one ranking gives its "
                                 'choice for every K: pass params={"k": K} for the K kept indices')
            if options.decode == "dpp":
                return dpp_ranking(scores, features, options.dpp_quality_scale).numpy()
            return ranking(scores, options).float().numpy()


def setup_tracking(tracking_uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` and make sure ``experiment`` exists; returns its id."""
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    if artifact_location is None and tracking_uri.startswith("sqlite:"):
        artifact_location = Path("outputs/mlartifacts").resolve().as_uri()
    return mlflow.create_experiment(experiment, artifact_location=artifact_location)


def log_and_register(autoselect_dir: str | Path, registered_model: str, tags: dict[str, str]) -> dict[str, str]:
    """Log the AutoSelect folder as a pyfunc model in the active run and register a new version."""
    from autoselect import AutoSelectConfig

    config = AutoSelectConfig.load(Path(autoselect_dir) / "config.json")
    signature = ModelSignature(  # N varies per image and backbone: only the width is fixed
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, config.vision_width or -1), "visual_tokens")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),  # a ranking; with params k: int64 indices
        params=ParamSchema([ParamSpec("k", "long", 0)]),
    )
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=AutoSelectScorerModel(),
        artifacts={ARTIFACT_KEY: str(autoselect_dir)},
        registered_model_name=registered_model,
        signature=signature,
        pip_requirements=scorer_requirements(),
    )
    version = info.registered_model_version
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version, key, value)
    return {"model_uri": info.model_uri, "registered_model": registered_model, "version": str(version)}


def download_autoselect(model_uri: str, dst: str | Path | None = None) -> Path:
    """Fetch a registered scorer (``models:/name@alias`` or ``models:/name/3``) as a local folder."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=None if dst is None else str(dst)))
    matches = sorted(root.rglob("config.json"))
    folders = [m.parent for m in matches if (m.parent / "model.safetensors").exists()]
    if not folders:
        raise FileNotFoundError(f"{model_uri} holds no AutoSelect folder (config.json + model.safetensors)")
    return folders[0]


def resolve_version(model_uri: str, client: MlflowClient | None = None):
    """The registered ``ModelVersion`` that ``models:/name@alias``, ``models:/name/3`` or
    ``models:/name/latest`` points at now (resolve once, then load that exact version)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = client or MlflowClient()
    resolved = get_model_name_and_version(client, model_uri)
    if len(resolved) != 2:
        raise ValueError(f"{model_uri} names a logged model, not a registered model version")
    return client.get_model_version(*resolved)


# --- the evaluation as version tags (pipelines/evaluate.py --tag-version; the demo goes through it)

SETTINGS_TAG_PREFIX = "eval_"  # the evaluation's settings (split, n, dtype, policy, model, scorer, ...)
EVALUATION_TAG_PREFIXES = ("retention", "paired_vs_", SETTINGS_TAG_PREFIX)  # tags an evaluation owns and replaces
_VERSION_URI = re.compile(r"^models:/[^/@]+(/\d+|/latest|@[^/@]+)$")  # a version, latest, or an alias


class TagVersionError(ValueError):
    """``--tag-version`` refused, before anything is evaluated."""


class NotAVersionURI(TagVersionError):
    """The URI is not ``models:/NAME/VERSION`` (or ``models:/NAME/latest``, ``models:/NAME@ALIAS``)."""


class VersionNotFound(TagVersionError):
    """The registry has no such model, version or alias."""


class NoScorerToTag(TagVersionError):
    """No AutoSelect scorer is evaluated, so there is no result to tag."""


class ScorerVersionMismatch(TagVersionError):
    """The version to tag is not the registered version that was evaluated."""


class UnverifiedScorerWarning(UserWarning):
    """A scorer folder is evaluated: nothing shows it holds the version being tagged."""


def _version_by_uri(uri: str, client: MlflowClient):
    """The ``ModelVersion`` behind ``models:/NAME/VERSION``, ``models:/NAME/latest`` or
    ``models:/NAME@ALIAS`` (resolved now, once); any other URI is refused."""
    if not _VERSION_URI.match(uri):
        raise NotAVersionURI(f"{uri!r} is not models:/NAME/VERSION (a version number), models:/NAME/latest "
                             "or models:/NAME@ALIAS")
    try:
        return resolve_version(uri, client)
    except MlflowException as exc:
        raise VersionNotFound(f"{uri}: {exc.message}") from None


def check_evaluated(target, evaluated_name: str, evaluated_version: str) -> None:
    """Refuse to tag ``target`` (a ``ModelVersion``) with the results of another registered version."""
    if (evaluated_name, str(evaluated_version)) != (target.name, str(target.version)):
        raise ScorerVersionMismatch(
            f"the evaluated scorer is {evaluated_name} v{evaluated_version}, not {target.name} v{target.version}: "
            "tag the version you evaluate")


def tag_target(uri: str, scorer: str | None, client: MlflowClient | None = None):
    """The ``ModelVersion`` that ``uri`` names, checked before an evaluation of ``scorer`` (the
    ``--autoselect`` source, None when AutoSelect is not evaluated) is allowed to tag it: the URI is
    ``models:/NAME/VERSION``, or ``models:/NAME/latest`` or ``models:/NAME@ALIAS`` resolved now to
    a version, that version exists, and a registry ``scorer`` is that same version. A scorer folder
    cannot be checked: allowed, with an ``UnverifiedScorerWarning``. Refusals raise a
    ``TagVersionError`` subclass."""
    if not scorer:
        raise NoScorerToTag("--tag-version needs an AutoSelect result to tag: pass --autoselect "
                            "(and keep autoselect in --pruners)")
    client = client or MlflowClient()
    target = _version_by_uri(uri, client)
    if scorer.startswith("models:/"):
        try:
            evaluated = _version_by_uri(scorer, client)
        except TagVersionError as exc:
            raise type(exc)(f"--autoselect {exc}") from None
        check_evaluated(target, evaluated.name, evaluated.version)
    else:
        warnings.warn(f"--autoselect {scorer} is a folder: nothing checks that it holds {target.name} "
                      f"v{target.version}; tagging that version with its results anyway", UnverifiedScorerWarning, stacklevel=2)
    return target


def tag_evaluation(target, tags: dict[str, str], client: MlflowClient | None = None) -> dict[str, str]:
    """Write an evaluation's ``tags`` to ``target`` (a ``ModelVersion``), first deleting the tags a
    previous evaluation left (every key starting with ``EVALUATION_TAG_PREFIXES``), so a gate never
    reads a number from another split, budget or task. Returns the tags written."""
    foreign = sorted(k for k in tags if not k.startswith(EVALUATION_TAG_PREFIXES))
    if foreign:
        raise ValueError(f"evaluation tags must start with {EVALUATION_TAG_PREFIXES}, got {foreign}")
    client = client or MlflowClient()
    for key in client.get_model_version(target.name, target.version).tags:
        if key.startswith(EVALUATION_TAG_PREFIXES) and key not in tags:
            client.delete_model_version_tag(target.name, target.version, key)
    for key, value in tags.items():
        client.set_model_version_tag(target.name, target.version, key, value)
    return dict(tags)
