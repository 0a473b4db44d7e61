"""Data and tools from the CLIP world outside mode_ray: img2dataset's shards, the zero-shot suite's label-only
shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mode_ray.demo import demo_data
from mode_ray.run_root.layout import RunPaths
from mode_ray.stages.prep import run_prep
from tests.conftest import demo_config


def _img2dataset_shards(out: Path, shards: int = 3, per_shard: int = 40) -> int:
    """Shards as img2dataset writes them (webdataset output format): `00000.tar` holding `KEY.jpg`, `KEY.txt`
    (the caption) and `KEY.json` (caption, url, key, status, sizes …), with `00000_stats.json` and
    `00000.parquet` (the per-sample table) beside each tar; keys are 9-digit shard+index strings."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        buf, rows = io.BytesIO(), []
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                sample = demo_data.make_sample(key, rng, "train")
                caption = json.loads(dict(sample.members)["json"])["caption"]
                meta = {
                    "caption": caption, "url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                    "error_message": None, "width": 64, "height": 64, "original_width": 64, "original_height": 64,
                    "exif": "{}", "sha256": "0" * 64,
                }  # fmt: skip
                rows.append(meta)
                for suffix, payload in (
                    ("jpg", dict(sample.members)["jpg"]),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (out / f"{s:05d}.tar").write_bytes(buf.getvalue())
        pq.write_table(pa.Table.from_pylist(rows), out / f"{s:05d}.parquet")
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return shards * per_shard


def test_img2dataset_output_goes_through_prep_with_nothing_lost(ray_session, tmp_path):
    """img2dataset's webdataset output through the whole prep, captions from each KEY.json (`data.caption_field:
    caption`): every sample in the manifest, none rejected. Its KEY.txt (`data.caption_field: txt`) is read by
    validation alone, the one step of prep that looks at the field, so that variant goes through prep's own read
    and validation (ShardDatasource, validate_batch, on Ray Data) instead of a second whole prep: every sample
    valid, with the same keys and captions as the manifest's (read from the json)."""
    import ray

    from mode_ray.data.reader import ShardDatasource
    from mode_ray.samples.validate import Limits, validate_batch

    shards = tmp_path / "laion-subset"
    n = _img2dataset_shards(shards)
    cfg = demo_config(tmp_path / "run", shards, "data.caption_field=caption", "clustering.n_fine=8")
    summary = run_prep(cfg)
    assert summary["samples_in"] == n and summary["in_manifest"] == n and summary["rejected_samples"] == 0
    manifest = pq.read_table(RunPaths(cfg.run_root).manifest, columns=["key", "caption"])
    assert manifest.num_rows == n and len(set(manifest["key"].to_pylist())) == n
    assert all(manifest["caption"].to_pylist())

    urls = sorted(str(tar) for tar in shards.glob("*.tar"))
    txt = ray.data.read_datasource(ShardDatasource(urls)).map_batches(
        validate_batch, fn_kwargs={"limits": Limits(caption_field="txt")}, batch_format="pyarrow"
    )
    by_txt = {
        row["key"]: (row["caption"], row["reason"])
        for row in txt.select_columns(["key", "caption", "reason"]).take_all()
    }
    assert len(by_txt) == n and all(caption and reason is None for caption, reason in by_txt.values())
    assert {
        k: (c, None) for k, c in zip(manifest["key"].to_pylist(), manifest["caption"].to_pylist(), strict=True)
    } == by_txt


def _label_only_shards(out: Path, n: int = 24) -> list[str]:
    """A classification set as the zero-shot suite ships it: an image and a label per sample, no caption."""
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    names = ["circle", "square", "triangle"]
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            img, attrs = demo_data.DRAW["shapes"](rng, "eval")
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG")
            shape = attrs["shape"] if attrs["shape"] in names else names[i % 3]
            for suffix, payload in (("jpg", jpg.getvalue()), ("json", json.dumps({"label": shape}).encode())):
                info = tarfile.TarInfo(f"s{i:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (out / "0.tar").write_bytes(buf.getvalue())
    return names


def test_eval_on_label_only_shards_has_no_retrieval_corpus_and_says_so(trained_run, tmp_path, capsys):
    import os

    from mode_ray.run_root.ownership import claim_run_root
    from mode_ray.stages.evaluate import run_eval

    cfg, _, _ = trained_run
    root = tmp_path / "run"
    claim_run_root(str(root))
    for name in ("prep", "clusters", "experts"):  # what eval reads; eval/ is this run's own
        os.symlink(os.path.join(cfg.run_root, name), root / name)
    shards = tmp_path / "labelled"
    names = _label_only_shards(shards)
    task = f"[{{name: shapes, source: webdataset, location: '{shards}', label_field: label, class_names: {names}}}]"
    sets = ("clustering.n_coarse=2", f"eval.shards={shards}", "eval.demo_tasks=false", f"eval.tasks={task}")
    eval_cfg = demo_config(root, cfg.data.shards, *sets)
    result = run_eval(eval_cfg)
    assert "no captions in eval.shards" in capsys.readouterr().err
    assert result["header"]["retrieval"] == "off" and result["tasks"] == ["shapes"]
    assert all(0 <= row["shapes"] <= 1 for row in result["accuracy"].values())
