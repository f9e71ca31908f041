"""Helpers for tests, demos and benchmarks: tiny VLMs and synthetic tasks (no downloads)."""

from autoselect.testing.tiny import build_tiny_llava, build_tiny_tokenizer, save_tiny_llava

__all__ = ["build_tiny_llava", "build_tiny_tokenizer", "save_tiny_llava"]
