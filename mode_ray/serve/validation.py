"""Request checks: every bad input becomes an HTTP 4xx with a message, before any model runs."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from mode_ray.config import ServeConfig
from mode_ray.samples.rejects import Reason
from mode_ray.samples.validate import Limits, Rejected, check_image
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
    max_batch_images: int
    image: Limits  # bytes and pixels, checked by the data pipeline's own image check

    @classmethod
    def from_config(cls, serve: ServeConfig) -> RequestLimits:
        image = Limits(max_image_bytes=serve.max_image_bytes, max_image_pixels=serve.max_image_pixels)
        return cls(serve.max_labels, serve.max_label_chars, serve.max_batch_images, image)


def decode_image(encoded: str, limits: RequestLimits, what: str = "inputs") -> bytes:
    """base64 → image bytes that fully decode within the byte and pixel limits (the pipeline's own image check,
    header first, so decompression bombs are refused before any pixel is decoded)."""
    if "," in encoded[:100] and encoded.startswith("data:"):
        encoded = encoded.split(",", 1)[1]  # data:image/png;base64,....
    encoded = "".join(encoded.split())
    if not encoded:
        raise RequestError(400, f"{what}: empty; expected a base64-encoded image")
    if len(encoded) * 3 // 4 > limits.image.max_image_bytes + 3:  # refused before decoding the base64
        raise RequestError(413, f"{what}: image larger than {limits.image.max_image_bytes} bytes")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(400, f"{what}: not valid base64 ({err})") from None
    try:
        check_image(payload, limits.image, full_decode=True)
    except Rejected as rej:
        status = 413 if rej.reason is Reason.IMAGE_TOO_LARGE else 400
        raise RequestError(status, f"{what}: {rej.reason} ({rej.detail})") from None
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
