"""Real image-text data from installed packages, exported as LLaVA JSONL + PNG folders with
fixed, seeded train / held-out splits (see ``export`` for the layout).

Sources: Fashion-MNIST (Debian ``dataset-fashion-mnist``), Open Clip Art (Debian
``openclipart-png`` + ``openclipart-svg``) and sample photos from scikit-image, scikit-learn and
matplotlib; and scenes composed from all three (items at random places on a photo, ``scenes``).
"""

from pipelines.corpora.common import MissingPackageError
from pipelines.corpora.export import (
    DEFAULT_OUT,
    FILES,
    SPLITS,
    ExportSettings,
    export_corpora,
    load_records,
    open_image,
    read_manifest,
    record_messages,
)

__all__ = [
    "DEFAULT_OUT",
    "FILES",
    "SPLITS",
    "ExportSettings",
    "MissingPackageError",
    "export_corpora",
    "load_records",
    "open_image",
    "read_manifest",
    "record_messages",
]
