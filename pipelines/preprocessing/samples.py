"""Sample validation: what makes a sample unusable, and turning Q/A turns into chat messages.

Every rejection is a :class:`Rejected` with one of the reasons below, so the preprocessing
step can write it to the quarantine table instead of dropping it or crashing the run.
"""

from __future__ import annotations

import io
from typing import Sequence

from PIL import Image

BAD_RECORD = "bad_record"  # unparseable line, malformed conversation, no usable text fields
MISSING_IMAGE = "missing_image"  # no image named, or the named file does not exist
CORRUPT_IMAGE = "corrupt_image"  # bytes that PIL cannot fully decode (truncated, not an image)
EMPTY_TEXT = "empty_text"  # a question or an answer is empty
TOO_LONG = "too_long"  # more tokens than --max-length after the processor ran
ENCODE_ERROR = "encode_error"  # the processor itself refused the sample
REASONS = (BAD_RECORD, MISSING_IMAGE, CORRUPT_IMAGE, EMPTY_TEXT, TOO_LONG, ENCODE_ERROR)


class Rejected(Exception):
    """A sample that goes to quarantine; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def chat_messages(turns: Sequence[tuple[str, str]]) -> list[dict]:
    """HF chat messages for one image and ``(question, answer)`` turns; the image goes first."""
    messages: list[dict] = []
    for n, (question, answer) in enumerate(turns):
        user = [{"type": "image"}] if n == 0 else []
        user.append({"type": "text", "text": question})
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def check_messages(messages: list[dict]) -> None:
    """Reject conversations without turns or with an empty question or answer."""
    if not messages:
        raise Rejected(BAD_RECORD, "no conversation turns")
    for n, message in enumerate(messages):
        texts = [part.get("text") or "" for part in message["content"] if part["type"] == "text"]
        if not "".join(texts).strip():
            raise Rejected(EMPTY_TEXT, f"{message['role']} turn {n // 2 + 1} is empty")


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` into an RGB image; truncated or non-image bytes are rejected."""
    if not data:
        raise Rejected(MISSING_IMAGE, "empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel, so truncation is caught here, not in the processor
            return image.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise Rejected(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None
