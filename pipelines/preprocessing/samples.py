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
IMAGE_TOO_LARGE = "image_too_large"  # over --max-image-bytes even as a JPEG (see stored_image)
REASONS = (BAD_RECORD, MISSING_IMAGE, CORRUPT_IMAGE, EMPTY_TEXT, TOO_LONG, ENCODE_ERROR, IMAGE_TOO_LARGE)

#: image formats a shard keeps as the source file's bytes; others are re-encoded as PNG (lossless)
KEPT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")  # MPO: a camera JPEG with extra frames
#: how a shard row's image bytes came to be (its ``image_encoding`` column)
SOURCE, LOSSLESS_PNG, LOSSY_JPEG = "source", "png", "jpeg"
IMAGE_ENCODINGS = (SOURCE, LOSSLESS_PNG, LOSSY_JPEG)
JPEG_QUALITY = 95


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
    return decode_image_and_format(data)[0]


def decode_image_and_format(data: bytes) -> tuple[Image.Image, str]:
    """The RGB image and the file's format as PIL names it (``"JPEG"``, ``"PNG"``, ...)."""
    if not data:
        raise Rejected(MISSING_IMAGE, "empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every pixel, so truncation is caught here, not in the processor
            return image.convert("RGB"), str(image.format)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise Rejected(CORRUPT_IMAGE, f"{type(exc).__name__}: {exc}") from None


def stored_image(data: bytes, max_bytes: int) -> tuple[bytes, str, Image.Image]:
    """``(bytes a shard keeps, how they came to be, the RGB image they decode to)`` for a source file.

    The source bytes when they are JPEG, PNG or WebP and at most ``max_bytes``; other formats
    (BMP, TIFF, GIF, ...) become a PNG of the decoded pixels, so training sees the same pixels
    either way. Only a file still over ``max_bytes`` is re-encoded lossily (JPEG, quality 95, same
    size); its tensors then come from those pixels at preprocessing and training alike, and an
    image over the cap even then is rejected. Raises :class:`Rejected` for bytes that do not decode.
    """
    image, fmt = decode_image_and_format(data)
    if fmt in KEPT_FORMATS and len(data) <= max_bytes:
        return data, SOURCE, image
    if fmt not in KEPT_FORMATS:
        png = encode_image(image, "PNG")
        if len(png) <= max_bytes:
            return png, LOSSLESS_PNG, image
    jpeg = encode_image(image, "JPEG", quality=JPEG_QUALITY)
    if len(jpeg) > max_bytes:
        raise Rejected(IMAGE_TOO_LARGE, f"{image.width}x{image.height} {fmt}: {len(data)} bytes, "
                       f"{len(jpeg)} as a JPEG, over max_image_bytes {max_bytes}")
    return jpeg, LOSSY_JPEG, decode_image(jpeg)


def encode_image(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()
