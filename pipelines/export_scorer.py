"""Export a trained AutoSelect scorer as the small folder inference needs (the scorer alone).

A training checkpoint and a registered version hold the scorer *and* the train-only denoiser
(they can resume training); inference runs the scorer alone, about 70 % of the weights on the
mini-LLaVA. This writes that part, as ``save_pretrained(..., inference_only=True)`` does, after
loading the source onto its backbone (which checks that it fits: vision width, backbone, finite
weights). The folders under ``artifacts/`` were made so.

    python pipelines/export_scorer.py --scorer outputs/ray/<run>/checkpoint_000004 \
        --model .cache/backbones/mini-llava-plain-drop2 --out artifacts/<name>/scorer
    python pipelines/export_scorer.py --scorer models:/autoselect-scenes@champion --model ... --out ...

``--scorer`` takes a Ray Train checkpoint (its ``autoselect/`` folder), a ``save_pretrained``
folder or a registry URI. The folder's ``inference`` options are what every consumer runs (Serve,
``evaluate.py``'s ``autoselect``); they are the training config's unless ``--inference KEY=VALUE``
(repeatable) gives them: then the given keys and the defaults for the rest, e.g. ``--inference
decode=topk`` for plain top-K whatever the run was configured to decode. Prints what it wrote
(JSON). Exit status 2 on a bad source, bad inference options or an --out that is not empty.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from autoselect.config import InferenceOptions
from autoselect.model import CONFIG_NAME, WEIGHTS_NAME
from minillava.assets import file_sha256
from mlops.backbone import load_autoselect, load_vlm
from pipelines.training import AUTOSELECT_DIR
from pipelines.training.config_io import from_mapping, set_dotted


def resolve_source(source: str) -> str:
    """A registry URI as it is; a checkpoint folder -> its ``autoselect/``; a saved folder as it is."""
    if source.startswith("models:/"):
        return source
    path = Path(source)
    if (path / AUTOSELECT_DIR / CONFIG_NAME).is_file():
        return str(path / AUTOSELECT_DIR)
    if (path / CONFIG_NAME).is_file():
        return str(path)
    raise ValueError(f"--scorer {source}: neither a saved AutoSelect folder (no {CONFIG_NAME}) nor a training "
                     f"checkpoint (no {AUTOSELECT_DIR}/{CONFIG_NAME}) nor a models:/ URI")


def inference_options(items: list[str], base: InferenceOptions | None = None, where: str = "--inference") -> InferenceOptions:
    """``["decode=topk", ...]`` -> the options they give, ``base``'s (default: the defaults) for the
    rest, checked as a config file's are (unknown keys and wrong types named, under ``where``)."""
    given: dict = dataclasses.asdict(base) if base is not None else {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{where} {item!r}: expected KEY=VALUE")
        set_dotted(given, key, value)
    return from_mapping(InferenceOptions, given, where=where)


def export(source: str, model_path: str, out: Path, dtype: str = "auto", tracking_uri: str | None = None,
           inference: list[str] | None = None) -> dict:
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty: export into a new folder")
    options = inference_options(inference) if inference else None  # bad options fail before any loading
    resolved = resolve_source(source)
    model, origin = load_autoselect(resolved, load_vlm(model_path, dtype), tracking_uri)
    if options is not None:
        model = model.with_inference(options)
    model.save_pretrained(out, inference_only=True)
    weights = out / WEIGHTS_NAME
    return {"source": origin, "out": str(out), "model": model_path, "budget": model.config.budget,
            "trained_vlm_dtype": model.trained_vlm_dtype,
            "inference": dataclasses.asdict(model.config.inference), "bytes": weights.stat().st_size, "sha256": file_sha256(weights),
            "parameters": sum(p.numel() for p in model.scorer.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scorer", required=True, help="a training checkpoint, a save_pretrained folder or models:/NAME@ALIAS")
    parser.add_argument("--model", required=True, help="the backbone the scorer was trained on (a folder or a built-in name)")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) folder")
    parser.add_argument("--dtype", default="auto", help="the backbone's dtype while loading (default: %(default)s; "
                                                        "the saved scorer keeps the dtype it was trained over)")
    parser.add_argument("--tracking-uri", default=None, help="for a models:/ source (default: the project's)")
    parser.add_argument("--inference", action="append", default=[], metavar="KEY=VALUE",
                        help="the folder's inference options (repeatable; the rest take their defaults), "
                             "e.g. decode=topk; default: the source's own")
    args = parser.parse_args(argv)
    try:
        summary = export(args.scorer, args.model, args.out, args.dtype, args.tracking_uri, args.inference)
    except (ValueError, FileNotFoundError) as error:
        print(f"export_scorer: {error}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
