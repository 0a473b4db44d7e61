from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest
from PIL import Image

from mode_ray.samples.rejects import Reason
from mode_ray.samples.shards import iter_tar_rows, list_shards
from mode_ray.samples.validate import RAW_SCHEMA, Limits, validate_batch


def _jpeg(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def _row(key, meta=None, image=None, txt=None, read_error=None):
    raw = json.dumps(meta).encode() if isinstance(meta, dict) else meta
    return {"key": key, "shard": "s", "json": raw, "txt": txt, "image": image, "read_error": read_error}


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (_row("a", {"caption": "ok"}, _jpeg()), None),
        (_row("b", None, _jpeg()), Reason.MISSING_CAPTION),
        (_row("c", b"{oops", _jpeg()), Reason.BAD_JSON),
        (_row("d", b"[1, 2]", _jpeg()), Reason.BAD_JSON),
        (_row("e", '{"caption": "caf\u00e9"}'.encode("latin-1"), _jpeg()), Reason.CAPTION_NOT_UTF8),
        (_row("f", {"caption": "   "}, _jpeg()), Reason.EMPTY_CAPTION),
        (_row("g", {"title": "no caption field"}, _jpeg()), Reason.EMPTY_CAPTION),
        (_row("h", {"caption": "x"}, None), Reason.MISSING_IMAGE),
        (_row("i", {"caption": "x"}, b"GIF89a-not-really"), Reason.NOT_AN_IMAGE),
        (_row("j", {"caption": "x"}, _jpeg()[:40]), Reason.NOT_AN_IMAGE),
        (_row("k", {"caption": "x"}, _jpeg((300, 300))), Reason.IMAGE_TOO_LARGE),
        (_row("l", {"caption": "x"}, _jpeg(), read_error="cut"), Reason.UNREADABLE_SHARD),
    ],
)
def test_each_reject_reason(row, reason):
    out = validate_batch(pa.Table.from_pylist([row], schema=RAW_SCHEMA), Limits(max_image_pixels=200 * 200))
    got = out.to_pylist()[0]
    assert got["reason"] == (None if reason is None else str(reason))
    if reason is None:
        assert got["caption"] == "ok" and (got["width"], got["height"]) == (8, 8)
    else:
        assert got["caption"] is None and got["image"] is None and got["detail"]


def test_caption_fields_texts_and_txt():
    meta = {"texts": ["first", "second", "third"], "caption": "c"}
    rows = [_row(f"k{i}", meta, _jpeg()) for i in range(30)]
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    picked = validate_batch(table, Limits(caption_field="texts", seed=1))["caption"].to_pylist()
    assert set(picked) == {"first", "second", "third"}  # seeded per key, not always the first
    assert picked == validate_batch(table, Limits(caption_field="texts", seed=1))["caption"].to_pylist()
    txt = pa.Table.from_pylist([_row("t", None, _jpeg(), txt=b"from txt")], schema=RAW_SCHEMA)
    assert validate_batch(txt, Limits(caption_field="txt"))["caption"].to_pylist() == ["from txt"]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_truncated_tar_keeps_what_precedes_the_cut():
    blob = _tar([("a.json", b"{}"), ("a.jpg", b"x" * 600), ("b.json", b"{}"), ("b.jpg", b"y" * 5000)])
    assert [r["read_error"] for r in iter_tar_rows(io.BytesIO(blob), "shard.tar")] == [None, None]
    rows = list(iter_tar_rows(io.BytesIO(blob[:5000]), "shard.tar"))  # cut inside b.jpg's data
    assert [r["key"] for r in rows] == ["a", "b", None]
    assert rows[0]["read_error"] is None and rows[0]["image"] == b"x" * 600
    assert "cut off" in rows[1]["read_error"] and "rest of shard" in rows[2]["read_error"]
    # Cut inside a header: tarfile alone would end quietly; the missing end-of-archive marker gives it away,
    # and the last sample seen cannot be known complete.
    rows = list(iter_tar_rows(io.BytesIO(blob[:3000]), "shard.tar"))
    assert [(r["key"], bool(r["read_error"])) for r in rows] == [("a", True), (None, True)]
    assert "end-of-archive" in rows[1]["read_error"]
    garbage = list(iter_tar_rows(io.BytesIO(b"not a tar at all" * 64), "g.tar"))
    assert len(garbage) == 1 and garbage[0]["key"] is None and garbage[0]["read_error"]


def test_list_shards_expands_and_reports_missing(tmp_path):
    for i in (0, 1, 10):
        (tmp_path / f"{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"{i % 2}" / f"{i}.tar").write_bytes(_tar([("a.json", b"{}")]))
    found, problems = list_shards(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in found] == ["0.tar", "1.tar", "10.tar"]
    found, _ = list_shards(f"{tmp_path}/*/1*.tar")
    assert len(found) == 2
    found, problems = list_shards([f"{tmp_path}/0/{{0,10}}.tar", f"{tmp_path}/9/9.tar", f"{tmp_path}/x/*.tar"])
    assert len(found) == 2
    assert [why for _, why in problems] == ["shard not found", "glob matched no .tar files"]
