"""Validate and decode raw webdataset samples into rows, or into rejects with a reason.

Plain Python/pyarrow/PIL (no Ray), so the rules are unit-testable; the prep stage runs `validate_batch`
inside Ray Data. Every input row comes out exactly once: as a valid row (reason null) or a reject.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from PIL import Image

from mode_ray.samples.rejects import Reason

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")

# Schema of the reader's output (one row per sample, raw bytes) ...
RAW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("json", pa.binary()),
        ("txt", pa.binary()),
        ("cls", pa.binary()),  # KEY.cls: an integer label (the zero-shot suite's classification sets)
        ("npy", pa.binary()),  # KEY.npy: a 0/1 vector over the classes (the suite's multi-label sets)
        ("image", pa.binary()),
        ("read_error", pa.string()),
    ]
)
# ... and of the validated rows: valid ones have reason null.
VALID_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("caption", pa.string()),
        ("texts", pa.list_(pa.string())),  # caption_field texts: every caption a training read may draw
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass(frozen=True)
class Limits:
    caption_field: str = "caption"
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 4_000_000
    seed: int = 0


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def seeded_key_hash(seed: int, key: str) -> int:
    """A 64-bit hash of a sample key under a seed: seeded choices that do not depend on read order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def texts_of(meta: dict[str, Any]) -> list[str]:
    """A sample's non-empty `texts` (the reference's list of captions; a string is a list of one)."""
    texts = meta.get("texts")
    if isinstance(texts, str):
        texts = [texts]
    return [t for t in texts or [] if isinstance(t, str) and t.strip()]


def pick_caption(meta: dict[str, Any], txt: bytes | None, key: str, limits: Limits) -> str:
    """The caption by the configured field; from a `texts` list one entry, chosen by a seeded hash of the key."""
    field = limits.caption_field
    if field == "texts":
        texts = texts_of(meta)
        if not texts:
            return ""
        return texts[seeded_key_hash(limits.seed, key) % len(texts)]
    if field == "txt" and txt is not None:
        return _utf8(txt)
    value = meta.get(field)
    return value if isinstance(value, str) else ""


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Rejected(Reason.CAPTION_NOT_UTF8, str(err)) from None


def parse_caption(raw_json: bytes | None, txt: bytes | None, key: str, limits: Limits) -> str:
    if raw_json is None and txt is None:
        raise Rejected(Reason.MISSING_CAPTION, "no .json (or .txt) member")
    meta: dict[str, Any] = {}
    if raw_json is not None:
        text = _utf8(raw_json)
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as err:
            raise Rejected(Reason.BAD_JSON, str(err)) from None
        if not isinstance(meta, dict):
            raise Rejected(Reason.BAD_JSON, f"json is a {type(meta).__name__}, not an object")
    caption = pick_caption(meta, txt, key, limits).strip()
    if not caption:
        raise Rejected(Reason.EMPTY_CAPTION, f"field {limits.caption_field!r} is missing or empty")
    return caption


def check_image(payload: bytes | None, limits: Limits, full_decode: bool = False) -> tuple[int, int]:
    """Decode enough of the image to know it is one, refusing oversized ones before any pixel is decoded.
    `full_decode` decodes every pixel (a request image must not fail later, in a model replica)."""
    if payload is None:
        raise Rejected(Reason.MISSING_IMAGE, "no image member")
    if len(payload) > limits.max_image_bytes:
        raise Rejected(Reason.IMAGE_TOO_LARGE, f"{len(payload)} bytes > {limits.max_image_bytes}")
    try:
        with Image.open(io.BytesIO(payload)) as img:
            width, height = img.size  # header only: no pixels decoded yet
            if width * height > limits.max_image_pixels:
                raise Rejected(Reason.IMAGE_TOO_LARGE, f"{width}x{height} > {limits.max_image_pixels} pixels")
            if not full_decode:
                img.draft("RGB", (min(width, 64), min(height, 64)))  # JPEG: decode at reduced scale, cheaply
            img.load()
    except Rejected:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise Rejected(Reason.NOT_AN_IMAGE, f"{type(err).__name__}: {without_addresses(str(err))}") from None
    return width, height


def without_addresses(message: str) -> str:
    """PIL names the buffer it could not read by its memory address; the rejects must be the same bytes in
    every run."""
    return re.sub(r" at 0x[0-9a-f]+", "", message)


def validate_row(row: dict[str, Any], limits: Limits) -> dict[str, Any]:
    out = {"key": row["key"], "shard": row["shard"], "caption": None, "texts": None, "image": None}
    out.update(width=None, height=None)
    try:
        if row.get("read_error"):
            raise Rejected(Reason.UNREADABLE_SHARD, row["read_error"])
        caption = parse_caption(row.get("json"), row.get("txt"), row["key"], limits)
        width, height = check_image(row.get("image"), limits)
    except Rejected as rej:
        stage = "read" if rej.reason is Reason.UNREADABLE_SHARD else "decode"
        return {**out, "stage": stage, "reason": str(rej.reason), "detail": rej.detail[:500]}
    return {
        **out,
        "caption": caption,
        "texts": texts_of(json.loads(row["json"])) if limits.caption_field == "texts" else None,
        "image": row["image"],
        "width": width,
        "height": height,
        "stage": None,
        "reason": None,
        "detail": None,
    }


def validate_batch(batch: pa.Table, limits: Limits) -> pa.Table:
    rows = [validate_row(row, limits) for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=VALID_SCHEMA)
