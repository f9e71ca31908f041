"""Images from ``image_url`` parts: ``data:`` URLs, allow-listed ``http(s)://`` hosts, ``s3://``.

Remote fetches are off unless the config allows the host or bucket (a server that fetches any
URL it is given can be turned against the network it runs in), and redirects must stay on
allowed hosts. Every refusal is a 400 naming the problem.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import io
import urllib.error
import urllib.request
from urllib.parse import urlparse

from PIL import Image, UnidentifiedImageError

from mlops import storage
from serve.config import ImagePolicy
from serve.errors import APIError


def _refuse(message: str, code: str) -> APIError:
    return APIError(message, param="messages", code=code)


class _AllowListRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allowed) -> None:
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(urlparse(newurl).hostname):
            raise _refuse(f"image URL redirects to {urlparse(newurl).hostname!r}, which is not allowed", "image_host_not_allowed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class ImageLoader:
    """Turns one ``image_url.url`` into an RGB PIL image within the policy's limits."""

    def __init__(self, policy: ImagePolicy) -> None:
        self.policy = policy
        self._opener = urllib.request.build_opener(_AllowListRedirects(self.host_allowed))

    def host_allowed(self, host: str | None) -> bool:
        return bool(host) and any(fnmatch.fnmatch(host.lower(), p.lower()) for p in self.policy.allowed_hosts)

    def load(self, url: str) -> Image.Image:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            data = self._data_url(url)
        elif scheme in ("http", "https"):
            data = self._http(url)
        elif scheme == "s3":
            data = self._s3(url)
        else:
            raise _refuse(f"unsupported image URL scheme {scheme or url[:16]!r}; use data:, http(s):// or s3://", "invalid_image_url")
        return self._decode(data)

    # ---- sources ------------------------------------------------------------------------
    def _too_large(self, size: int) -> APIError:
        return _refuse(f"image is {size} bytes, over the limit of {self.policy.max_image_bytes} bytes", "image_too_large")

    def _data_url(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise _refuse("data: image URLs must be base64 (data:image/png;base64,...)", "invalid_image_url")
        if len(payload) * 3 // 4 > self.policy.max_image_bytes + 3:  # refuse before decoding
            raise self._too_large(len(payload) * 3 // 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _refuse(f"image data URL is not valid base64: {exc}", "invalid_base64") from None
        if len(data) > self.policy.max_image_bytes:
            raise self._too_large(len(data))
        return data

    def _http(self, url: str) -> bytes:
        host = urlparse(url).hostname
        if not self.host_allowed(host):
            raise _refuse(f"remote image host {host!r} is not in the server's allow-list", "image_host_not_allowed")
        try:
            with self._opener.open(url, timeout=self.policy.fetch_timeout_s) as response:
                data = response.read(self.policy.max_image_bytes + 1)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _refuse(f"could not fetch image {url}: {exc}", "image_fetch_failed") from None
        if len(data) > self.policy.max_image_bytes:
            raise self._too_large(len(data))
        return data

    def _s3(self, url: str) -> bytes:
        bucket = urlparse(url).netloc
        if not any(fnmatch.fnmatch(bucket, p) for p in self.policy.allowed_s3_buckets):
            raise _refuse(f"s3 bucket {bucket!r} is not in the server's allow-list", "image_host_not_allowed")
        fs, path = storage.resolve(url, self.policy.s3_endpoint)
        try:
            info = fs.get_file_info(path)
            if info.size is None:
                raise FileNotFoundError(path)
            if info.size > self.policy.max_image_bytes:
                raise self._too_large(info.size)
            return storage.read_bytes(fs, path)
        except (OSError, FileNotFoundError) as exc:
            raise _refuse(f"could not read image {url}: {exc}", "image_fetch_failed") from None

    # ---- decoding -----------------------------------------------------------------------
    def _decode(self, data: bytes) -> Image.Image:
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > self.policy.max_image_pixels:
                raise _refuse(f"image is {width}x{height} pixels, over the limit of {self.policy.max_image_pixels}", "image_too_large")
            image.load()
        except APIError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise _refuse(f"image bytes are not a decodable image ({type(exc).__name__})", "invalid_image") from None
        return image.convert("RGB")
