"""Why a sample was rejected: one vocabulary shared by the demo-data faults, data prep and training; and the
row filters that split a validated table into what goes on and what goes to rejects/.

Ray Data's tasks run these filters, and a task worker imports the module a function comes from: they live
here, beside nothing heavier than pyarrow, so those workers do not import torch and faiss (~2.5 core-s each on
2 cores) the way `mode_ray.stages.prep` would make them."""

from __future__ import annotations

from enum import Enum

import pyarrow as pa
import pyarrow.compute as pc

REJECT_COLUMNS = ["shard", "key", "stage", "reason", "detail"]


class Reason(str, Enum):
    """Reject reasons. Every input sample ends in the manifest or in rejects with one of these."""

    UNREADABLE_SHARD = "unreadable_shard"  # the tar (or the rest of it) could not be read
    MISSING_CAPTION = "missing_caption"  # no KEY.json member
    BAD_JSON = "bad_json"  # KEY.json is not valid JSON (or not an object)
    CAPTION_NOT_UTF8 = "caption_not_utf8"  # KEY.json bytes are not UTF-8
    EMPTY_CAPTION = "empty_caption"  # the caption field is missing, empty or whitespace
    MISSING_IMAGE = "missing_image"  # no KEY.jpg / KEY.jpeg / KEY.png member
    IMAGE_TOO_LARGE = "image_too_large"  # over data.max_image_bytes or data.max_image_pixels
    NOT_AN_IMAGE = "not_an_image"  # image bytes that do not decode

    def __str__(self) -> str:
        return self.value


def only_valid(batch: pa.Table) -> pa.Table:
    """The rows no step rejected (`reason` is null)."""
    return batch.filter(pc.is_null(batch["reason"]))


def only_rejects(batch: pa.Table) -> pa.Table:
    """The rejected rows, in rejects/' columns."""
    return batch.filter(pc.is_valid(batch["reason"])).select(REJECT_COLUMNS)
