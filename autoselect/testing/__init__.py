"""Tiny from-config VLMs and synthetic tasks (no downloads) for quick starts (`make tiny-demo`), the
evaluation's synthetic tasks, the built-in ``autoselect-testing/tiny-*`` ids and the tests. Never
the default backbone of a production config (that is the real mini-LLaVA, ``mlops.backbone.MINI_LLAVA``);
what only the tests use lives in ``tests/support/``."""

from autoselect.testing.tiny import build_tiny_llava, build_tiny_tokenizer, save_tiny_llava

__all__ = ["build_tiny_llava", "build_tiny_tokenizer", "save_tiny_llava"]
