"""The OpenAPI schema states the limits the server enforces, so clients and fuzzers see the real contract.

The request models in `schemas.py` are fixed at import, but the limits come from the run's config
(`serve.max_labels`, …) and the model names from the run. The ingress therefore publishes FastAPI's own
schema with these constraints added (JSON Schema keywords OpenAPI 3.1 knows); `validation.py` enforces
the same numbers with readable messages. Only what a schema can say is stated: whether the bytes are an
image within the pixel limit is checked by decoding it (a 400/413 with the reason).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from mode_ray.serve.validation import RequestLimits

NON_BLANK = r"\S"  # at least one character that is not whitespace
HAS_SLOT = r"\{\}"  # a template carries '{}' for the label
BASE64 = r"^(data:[^,]*,)?[A-Za-z0-9+/=\s]+$"  # base64, optionally behind a data: URL prefix
# An 8x8 white PNG: the example a client (or a fuzzer's example phase) can send as is.
EXAMPLE_IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR42mP8zwABTAwUMQBJQQEPkWFcdwAAAABJRU5ErkJggg=="


def _base64_image(limits: RequestLimits) -> dict[str, Any]:
    longest = 4 * math.ceil(limits.image.max_image_bytes / 3) + 100  # base64 of the largest image + data: URL
    return {
        "minLength": 1,
        "maxLength": longest,
        "pattern": BASE64,
        "contentEncoding": "base64",
        "contentMediaType": "image/*",
        "description": f"A base64 JPEG/PNG/WebP image (a data: URL prefix is accepted): at most "
        f"{limits.image.max_image_bytes} bytes and {limits.image.max_image_pixels} pixels; 400/413 otherwise.",
    }


def _array_of(prop: dict[str, Any]) -> dict[str, Any]:
    """The array branch of an optional list property (pydantic writes `anyOf: [array, null]`)."""
    return next(p for p in prop.get("anyOf", [prop]) if p.get("type") == "array")


def stated_limits(schema: dict[str, Any], limits: RequestLimits, models: list[str]) -> dict[str, Any]:
    """A copy of FastAPI's OpenAPI schema with the server's limits and model names in it."""
    out = copy.deepcopy(schema)
    defs = out["components"]["schemas"]
    params = defs["ZeroShotParameters"]["properties"]
    label = {"type": "string", "minLength": 1, "maxLength": limits.max_label_chars, "pattern": NON_BLANK}
    params["candidate_labels"].update(
        minItems=2, maxItems=limits.max_labels, uniqueItems=True, items=label,
        description=f"Class names: 2 to {limits.max_labels} distinct, each 1 to {limits.max_label_chars} "
        "characters and not blank.",
    )  # fmt: skip
    template = {"type": "string", "maxLength": 4 * limits.max_label_chars, "pattern": HAS_SLOT}
    params["hypothesis_template"].update(template)
    _array_of(params["hypothesis_templates"]).update(minItems=1, items=template)
    params["model"]["enum"] = ["ensemble", *models]
    params["candidate_labels"]["examples"] = [["circle", "square", "star"]]
    defs["ZeroShotRequest"]["properties"]["inputs"].update(_base64_image(limits), examples=[EXAMPLE_IMAGE])
    batch = defs["BatchZeroShotRequest"]["properties"]["inputs"]
    batch.update(minItems=1, maxItems=limits.max_batch_images, items={"type": "string", **_base64_image(limits)})
    batch["examples"] = [[EXAMPLE_IMAGE]]
    return out
