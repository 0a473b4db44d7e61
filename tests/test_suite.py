"""The zero-shot suite in CLIP_benchmark's webdataset layout, with CLIP_benchmark itself as the oracle."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mode_ray import demo_data
from mode_ray.config import EvalTaskConfig
from mode_ray.eval.suite import as_webdataset_task, read_dataset
from mode_ray.ownership import claim_run_root
from tests.conftest import demo_config

CLASSES = ["circle", "square", "triangle", "star"]


def suite_dataset(root: Path, n: int = 120, shards: int = 2, fmt: str = "webp", kind: str | None = None) -> Path:
    """A classification dataset as the suite ships it: test/{0..n-1}.tar with KEY.webp + KEY.cls, nshards.txt,
    classnames.txt, templates with {c}; `kind` writes dataset_type.txt."""
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(5)
    samples = []
    while len(samples) < n:
        img, attrs = demo_data.DRAW["shapes"](rng, "eval")
        if attrs["shape"] in CLASSES:
            buf = io.BytesIO()
            img.save(buf, format=fmt.upper())
            samples.append((buf.getvalue(), CLASSES.index(attrs["shape"])))
    for s in range(shards):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for i, (image, label) in enumerate(samples[s::shards]):
                for suffix, payload in ((fmt, image), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"s{s}_{i:05d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        (root / "test" / f"{s}.tar").write_bytes(out.getvalue())
    (root / "test" / "nshards.txt").write_text(str(shards))
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c} shape.\n")
    if kind:
        (root / "dataset_type.txt").write_text(kind + "\n")
    return root


def test_the_layout_reads_as_a_task_and_bad_datasets_are_clear_errors(tmp_path):
    good = suite_dataset(tmp_path / "wds_shapes", n=20)
    task = as_webdataset_task(EvalTaskConfig(name="shapes", source="clip_benchmark", location=str(good)))
    assert task.class_names == CLASSES and task.templates == ["a photo of a {}.", "a drawing of a {} shape."]
    assert task.location == [f"{good}/test/0.tar", f"{good}/test/1.tar"] and task.label_field == "cls"
    (good / "test" / "nshards.txt").unlink()
    with pytest.raises(ValueError, match="nshards.txt is missing"):
        read_dataset(str(good))
    for kind in ("retrieval", "multilabel"):
        other = suite_dataset(tmp_path / f"wds_{kind}", n=8, kind=kind)
        with pytest.raises(ValueError, match=f"is a {kind} dataset"):
            as_webdataset_task(EvalTaskConfig(name=kind, source="clip_benchmark", location=str(other)))


def _clip_benchmark_top1(export: Path, dataset: Path, out: Path) -> dict:
    """CLIP_benchmark's own CLI on the export, as `clip_benchmark eval --model local-dir:EXPORT`.

    CLIP_benchmark 1.6.2's `accuracy()` passes a 1-element array to `float`, which numpy >= 2.4 refuses; the
    wrapper replaces only that cast (`.item()`), leaving its classifier, data loading and metrics as they are.
    Its mean per-class recall (scikit-learn's balanced accuracy) does not go through that function at all."""
    wrapper = (
        "import sys, clip_benchmark.metrics.zeroshot_classification as z\n"
        "def accuracy(output, target, topk=(1,)):\n"
        "    pred = output.topk(max(topk), 1, True, True)[1].t()\n"
        "    correct = pred.eq(target.view(1, -1).expand_as(pred))\n"
        "    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]\n"
        "z.accuracy = accuracy\n"
        "from clip_benchmark.cli import main\n"
        "sys.exit(main())\n"
    )
    args = [
        "eval", "--model", f"local-dir:{export}", "--pretrained", "none", "--dataset", "wds/shapes",
        "--dataset_root", str(dataset), "--task", "zeroshot_classification", "--output", str(out),
        "--batch_size", "32", "--num_workers", "0", "--no_amp", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=600, env=env, cwd=out.parent
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["metrics"]


def test_mode_ray_and_clip_benchmark_agree_on_the_same_export(trained_run, tmp_path):
    from mode_ray.layout import RunPaths
    from mode_ray.stages.evaluate import run_eval

    cfg, _, _ = trained_run
    dataset = suite_dataset(tmp_path / "wds_shapes")
    root = tmp_path / "run"
    claim_run_root(str(root))
    for name in ("prep", "clusters", "experts"):  # what eval reads; eval/ is this run's own
        os.symlink(os.path.join(cfg.run_root, name), root / name)
    task = f"[{{name: shapes, source: clip_benchmark, location: '{dataset}'}}]"
    sets = ("clustering.n_coarse=2", "eval.shards=null", "eval.demo_tasks=false", f"eval.tasks={task}")
    result = run_eval(demo_config(root, cfg.data.shards, *sets))
    recall = json.loads((root / "eval" / "summary.json").read_text())["mean_per_class_recall"]
    for model in ("generalist", "expert-0"):
        theirs = _clip_benchmark_top1(Path(RunPaths(str(root)).export(model)), dataset, tmp_path / f"{model}.json")
        ours = (100 * result["accuracy"][model]["shapes"], 100 * recall[model]["shapes"])
        print(f"{model}: top-1 {ours[0]:.2f} vs {100 * theirs['acc1']:.2f}, per-class recall {ours[1]:.2f} vs "
              f"{100 * theirs['mean_per_class_recall']:.2f} (mode_ray vs CLIP_benchmark)")  # fmt: skip
        assert abs(100 * result["accuracy"][model]["shapes"] - 100 * theirs["acc1"]) <= 0.5
        assert abs(100 * recall[model]["shapes"] - 100 * theirs["mean_per_class_recall"]) <= 0.5


def test_a_dataset_on_s3_reads_like_a_local_one(s3_endpoint, tmp_path):
    from mode_ray.config import S3Config
    from mode_ray.storage import get_fs

    local = suite_dataset(tmp_path / "wds_shapes", n=12)
    s3 = S3Config(endpoint_url=s3_endpoint, region="us-east-1")
    fs, _ = get_fs("s3://mode-test/suite", s3)
    fs.put(str(local), "mode-test/suite/wds_shapes", recursive=True)
    task = as_webdataset_task(
        EvalTaskConfig(name="s", source="clip_benchmark", location="s3://mode-test/suite/wds_shapes"), s3
    )
    assert task.class_names == CLASSES and task.location[0] == "s3://mode-test/suite/wds_shapes/test/0.tar"


def test_labels_that_do_not_index_classnames_are_a_clear_error():
    import pyarrow as pa

    from mode_ray.stages.evaluate import _task_data, with_cls_label

    task = EvalTaskConfig(name="shapes", source="webdataset", location="x", label_field="cls", class_names=CLASSES)
    metas = [with_cls_label(None, str(label).encode()) for label in (0, 3, 7, 9)]  # 7 and 9: no such class
    rows = pa.table({"key": list("abcd"), "meta": metas, "reason": [None] * 4})
    with pytest.raises(ValueError, match="classnames.txt does not match its labels"):
        _task_data(task, rows, [], ["{}"])
