"""Request checks: every bad input becomes an HTTP 4xx with a message, before any model runs."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image

from mode_ray.config import ServeConfig
from mode_ray.serve.schemas import ZeroShotParameters


class RequestError(Exception):
    """A bad request: answered with `status` and a JSON {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RequestLimits:
    max_labels: int
    max_label_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_batch_images: int

    @classmethod
    def from_config(cls, serve: ServeConfig) -> RequestLimits:
        return cls(
            serve.max_labels,
            serve.max_label_chars,
            serve.max_image_bytes,
            serve.max_image_pixels,
            serve.max_batch_images,
        )


def decode_image(encoded: str, limits: RequestLimits, what: str = "inputs") -> bytes:
    """base64 → image bytes that fully decode within the byte and pixel limits (checked header first)."""
    if "," in encoded[:100] and encoded.startswith("data:"):
        encoded = encoded.split(",", 1)[1]  # data:image/png;base64,....
    encoded = "".join(encoded.split())
    if not encoded:
        raise RequestError(400, f"{what}: empty; expected a base64-encoded image")
    if len(encoded) * 3 // 4 > limits.max_image_bytes + 3:
        raise RequestError(413, f"{what}: image larger than {limits.max_image_bytes} bytes")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{what}: not valid base64 ({err})") from None
    if len(payload) > limits.max_image_bytes:
        raise RequestError(413, f"{what}: image of {len(payload)} bytes > {limits.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(payload)) as img:
            width, height = img.size  # header only: bombs are refused before any pixel is decoded
            if width * height > limits.max_image_pixels:
                raise RequestError(413, f"{what}: {width}x{height} image > {limits.max_image_pixels} pixels")
            img.convert("RGB")  # the whole image decodes, so the models cannot fail on it later
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(400, f"{what}: not a decodable image ({type(err).__name__}: {err})") from None
    return payload


def check_parameters(params: ZeroShotParameters, limits: RequestLimits) -> tuple[list[str], list[str]]:
    """(labels, templates) after the label and template checks."""
    labels = params.candidate_labels
    if len(labels) < 2:
        raise RequestError(422, f"candidate_labels: need at least 2 labels, got {len(labels)}")
    if len(labels) > limits.max_labels:
        raise RequestError(422, f"candidate_labels: at most {limits.max_labels} labels, got {len(labels)}")
    for i, label in enumerate(labels):
        if not label.strip():
            raise RequestError(422, f"candidate_labels[{i}]: empty label")
        if len(label) > limits.max_label_chars:
            raise RequestError(422, f"candidate_labels[{i}]: longer than {limits.max_label_chars} characters")
    if len(set(labels)) != len(labels):
        raise RequestError(422, "candidate_labels: labels must be distinct")
    templates = params.hypothesis_templates or [params.hypothesis_template]
    for t in templates:
        if "{}" not in t:
            raise RequestError(422, f"hypothesis template {t!r} has no '{{}}' for the label")
        if len(t) > 4 * limits.max_label_chars:
            raise RequestError(422, "hypothesis template too long")
    return labels, templates
