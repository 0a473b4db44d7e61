"""Eval rows from what Ray Data reads: a webdataset tar's members or an image folder's files → one row per
image (its key, metadata, caption, the image bytes, or why it cannot be used).

Ray Data's read tasks run these functions, and a task worker imports the module a function comes from: they
live here, with nothing heavier than pyarrow and numpy, so those workers do not import torch and open_clip
(~4 core-s each on 2 cores) the way `mode_ray.stages.evaluate` would make them."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa

from mode_ray.eval.suite import LABEL_FIELD, MULTI_LABEL_FIELD
from mode_ray.samples.rejects import Reason
from mode_ray.samples.validate import Limits, Rejected, check_image, parse_caption

ROW_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("meta", pa.string()),  # the sample's json (webdataset) or {"class_dir": …} (folder)
        ("caption", pa.string()),
        ("txt", pa.string()),  # KEY.txt as text: a suite retrieval set's captions, one per line
        ("image", pa.binary()),
        ("reason", pa.string()),  # why the image cannot be used; null when it can
    ]
)


def webdataset_rows(batch: pa.Table, limits: Limits) -> pa.Table:
    """Raw tar rows → eval rows: the json kept for labels, a caption when there is one, the image checked."""
    rows = []
    for row in batch.to_pylist():
        out = {"key": f"{row['shard']}#{row['key']}", "meta": None, "caption": None, "image": None, "reason": None}
        raw = row.get("json")
        if raw is not None:
            try:
                out["meta"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                out["meta"] = None
        if row.get("cls") is not None or row.get("npy") is not None:  # the suite's labels, beside the json
            out["meta"] = with_suite_labels(out["meta"], row.get("cls"), row.get("npy"))
        out["txt"] = row["txt"].decode("utf-8", errors="replace") if row.get("txt") is not None else None
        try:
            out["caption"] = parse_caption(raw, row.get("txt"), row["key"] or "", limits) or None
        except Rejected:
            out["caption"] = None  # no caption: still a classification image, not a retrieval text
        try:
            if row.get("read_error"):
                raise Rejected(Reason.UNREADABLE_SHARD, row["read_error"])
            check_image(row.get("image"), limits)
            out["image"] = row["image"]
        except Rejected as rej:
            out["reason"] = str(rej.reason)
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def with_suite_labels(meta: str | None, cls: bytes | None, npy: bytes | None = None) -> str:
    """The sample's metadata with its `.cls` label under `cls` (an int; anything else kept as text, which no
    class matches, so it is counted as an unknown label) and its `.npy` multi-label vector under `npy` (a
    list; an unreadable one as text, likewise counted)."""
    try:
        parsed = json.loads(meta) if meta else {}
    except ValueError:
        parsed = {}
    out = parsed if isinstance(parsed, dict) else {}
    if cls is not None:
        text = cls.decode("utf-8", errors="replace").strip()
        out[LABEL_FIELD] = int(text) if text.lstrip("-").isdigit() else text
    if npy is not None:
        try:
            out[MULTI_LABEL_FIELD] = np.load(io.BytesIO(npy), allow_pickle=False).reshape(-1).tolist()
        except (ValueError, OSError) as err:
            out[MULTI_LABEL_FIELD] = f"unreadable .npy: {err}"
    return json.dumps(out)


def folder_rows(batch: pa.Table, limits: Limits, root: str) -> pa.Table:
    """read_binary_files rows → eval rows; the class is the first folder under the task's root."""
    rows = []
    prefix = root.split("://", 1)[-1].rstrip("/") + "/"
    for payload, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist(), strict=True):
        rel = path.split("://", 1)[-1]
        rel = rel[len(prefix) :] if rel.startswith(prefix) else rel
        out = {"key": path, "meta": json.dumps({"class_dir": rel.split("/", 1)[0]}), "caption": None}
        try:
            check_image(payload, limits)
            rows.append({**out, "image": payload, "reason": None})
        except Rejected as rej:
            rows.append({**out, "image": None, "reason": str(rej.reason)})
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
