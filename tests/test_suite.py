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

from mode_ray.config import EvalTaskConfig
from mode_ray.demo import demo_data
from mode_ray.eval.suite import as_webdataset_task, read_dataset
from mode_ray.run_root.ownership import claim_run_root
from tests.conftest import demo_config

CLASSES = ["circle", "square", "triangle", "star"]


COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


def suite_dataset(root: Path, n: int = 120, shards: int = 2, fmt: str = "webp", kind: str | None = None) -> Path:
    """A dataset as the suite ships it: test/{0..n-1}.tar, nshards.txt, and by `kind` (dataset_type.txt):
    classification — KEY.webp + KEY.cls, classnames.txt, templates with {c}; retrieval — KEY.txt with two
    captions per image (unique to it, so no two texts tie); multilabel — KEY.npy, a 0/1 vector over shape
    and colour classes."""
    (root / "test").mkdir(parents=True)
    rng = np.random.default_rng(5)
    classes = CLASSES + COLORS if kind == "multilabel" else CLASSES
    samples = []
    while len(samples) < n:
        img, attrs = demo_data.DRAW["shapes"](rng, "eval")
        if attrs["shape"] not in CLASSES or attrs["color"] not in COLORS:
            continue
        buf = io.BytesIO()
        img.save(buf, format=fmt.upper())
        i = len(samples)
        if kind == "retrieval":
            label = ("txt", f"a {attrs['color']} {attrs['shape']} number {i}\npicture {i}: a {attrs['shape']}\n")
        elif kind == "multilabel":
            vector = np.zeros(len(classes), dtype=np.int64)
            vector[[classes.index(attrs["shape"]), classes.index(attrs["color"])]] = 1
            npy = io.BytesIO()
            np.save(npy, vector)
            label = ("npy", npy.getvalue())
        else:
            label = ("cls", str(CLASSES.index(attrs["shape"])))
        samples.append((buf.getvalue(), label))
    for s in range(shards):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for i, (image, (suffix, payload)) in enumerate(samples[s::shards]):
                for member, data in ((fmt, image), (suffix, payload)):
                    data = data.encode() if isinstance(data, str) else data
                    info = tarfile.TarInfo(f"s{s}_{i:05d}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / "test" / f"{s}.tar").write_bytes(out.getvalue())
    (root / "test" / "nshards.txt").write_text(str(shards))
    if kind != "retrieval":
        (root / "classnames.txt").write_text("\n".join(classes) + "\n")
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
    retrieval = as_webdataset_task(
        EvalTaskConfig(
            name="caps", source="clip_benchmark", location=str(suite_dataset(tmp_path / "r", 4, 1, "png", "retrieval"))
        )
    )
    assert (retrieval.kind, retrieval.class_names, retrieval.merge_identical_captions) == ("retrieval", None, False)
    multi = as_webdataset_task(
        EvalTaskConfig(
            name="ml", source="clip_benchmark", location=str(suite_dataset(tmp_path / "m", 4, 1, "png", "multilabel"))
        )
    )
    assert (multi.kind, multi.label_field, multi.class_names) == ("multilabel", "npy", CLASSES + COLORS)
    with pytest.raises(ValueError, match="is a multilabel dataset"):
        as_webdataset_task(
            EvalTaskConfig(name="ml", source="clip_benchmark", location=str(tmp_path / "m"), kind="retrieval")
        )
    (tmp_path / "m" / "dataset_type.txt").write_text("segmentation\n")
    with pytest.raises(ValueError, match="says 'segmentation'"):
        read_dataset(str(tmp_path / "m"))


def _clip_benchmark(runs: list[tuple[Path, Path, Path, str]]) -> list[dict]:
    """CLIP_benchmark's own CLI on each (export, dataset, output, task), as `clip_benchmark eval --model
    local-dir:EXPORT`, one after another in one process (its `main()` reads `sys.argv`): torch, open_clip and
    CLIP_benchmark are imported once, not once per evaluation.

    CLIP_benchmark 1.6.2's `accuracy()` passes a 1-element array to `float`, which numpy >= 2.4 refuses; the
    wrapper replaces only that cast (`.item()`), leaving its classifier, data loading and metrics as they are.
    Its mean per-class recall (scikit-learn's balanced accuracy), mean average precision and retrieval recall
    do not go through that function at all."""
    wrapper = (
        "import json, sys, clip_benchmark.metrics.zeroshot_classification as z\n"
        "def accuracy(output, target, topk=(1,)):\n"
        "    pred = output.topk(max(topk), 1, True, True)[1].t()\n"
        "    correct = pred.eq(target.view(1, -1).expand_as(pred))\n"
        "    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]\n"
        "z.accuracy = accuracy\n"
        "from clip_benchmark.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['clip_benchmark', *argv]\n"
        "    main()\n"
    )
    argvs = [
        ["eval", "--model", f"local-dir:{export}", "--pretrained", "none", "--dataset", f"wds/{dataset.name}",
         "--dataset_root", str(dataset), "--task", task, "--output", str(out), "--recall_k", "1", "5",
         "--batch_size", "32", "--num_workers", "0", "--no_amp", "--quiet"]
        for export, dataset, out, task in runs
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", wrapper, json.dumps(argvs)],
        capture_output=True, text=True, timeout=600, env=env, cwd=runs[0][2].parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(out.read_text())["metrics"] for _, _, out, _ in runs]


def test_mode_ray_and_clip_benchmark_agree_on_the_same_export(trained_run, tmp_path):
    """One `eval.benchmark` over a classification, a retrieval and a multi-label dataset (and one that is not
    there); CLIP_benchmark's CLI on the same exports and folders gives the same numbers."""
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.stages.evaluate import run_eval

    cfg, _, _ = trained_run
    suite = tmp_path / "suite"
    shapes = suite_dataset(suite / "wds_shapes")
    caps = suite_dataset(suite / "wds_shapecaps", n=60, kind="retrieval")
    multi = suite_dataset(suite / "wds_shapesml", n=60, kind="multilabel")
    root = tmp_path / "run"
    claim_run_root(str(root))
    for name in ("prep", "clusters", "experts"):  # what eval reads; eval/ is this run's own
        os.symlink(os.path.join(cfg.run_root, name), root / name)
    bench = f"{{root: '{suite}', datasets: [shapes, shapecaps, shapesml, absent]}}"
    sets = ("clustering.n_coarse=2", "eval.shards=null", "eval.demo_tasks=false", f"eval.benchmark={bench}")
    result = run_eval(demo_config(root, cfg.data.shards, *sets))
    summary = json.loads((root / "eval" / "summary.json").read_text())

    def run(model: str, dataset: Path, task: str = "zeroshot_classification") -> tuple[Path, Path, Path, str]:
        export = Path(RunPaths(str(root)).export(model))
        return export, dataset, tmp_path / f"{model}-{dataset.name}.json", task

    cb_shapes_generalist, cb_shapes_expert, cb_caps, cb_multi = _clip_benchmark(
        [run("generalist", shapes), run("expert-0", shapes), run("generalist", caps, "zeroshot_retrieval"),
         run("generalist", multi)]
    )  # fmt: skip
    for model, cb in (("generalist", cb_shapes_generalist), ("expert-0", cb_shapes_expert)):
        ours = (100 * result["accuracy"][model]["shapes"], 100 * summary["mean_per_class_recall"][model]["shapes"])
        print(f"{model}: top-1 {ours[0]:.2f} vs {100 * cb['acc1']:.2f}, per-class recall {ours[1]:.2f} vs "
              f"{100 * cb['mean_per_class_recall']:.2f} (mode_ray vs CLIP_benchmark)")  # fmt: skip
        assert abs(ours[0] - 100 * cb["acc1"]) <= 0.5 and abs(ours[1] - 100 * cb["mean_per_class_recall"]) <= 0.5
    recall = summary["retrieval"]["generalist"]["shapecaps"]
    for k in (1, 5):
        print(f"recall@{k}: i2t {recall[f'i2t_r@{k}']:.4f} vs {cb_caps[f'text_retrieval_recall@{k}']:.4f}, "
              f"t2i {recall[f't2i_r@{k}']:.4f} vs {cb_caps[f'image_retrieval_recall@{k}']:.4f}")  # fmt: skip
        assert abs(recall[f"i2t_r@{k}"] - cb_caps[f"text_retrieval_recall@{k}"]) <= 0.005
        assert abs(recall[f"t2i_r@{k}"] - cb_caps[f"image_retrieval_recall@{k}"]) <= 0.005
    ours_map = summary["mean_average_precision"]["generalist"]["shapesml"]
    print(f"mAP {ours_map:.4f} vs {cb_multi['mean_average_precision']:.4f}")
    assert abs(ours_map - cb_multi["mean_average_precision"]) <= 0.005
    # the suite average: each dataset's main metric, over the three that are there
    assert summary["suite"]["missing"] == ["absent"]
    average = summary["suite"]["average"]["generalist"]
    expected = np.mean(
        [
            result["accuracy"]["generalist"]["shapes"],
            (recall["i2t_r@1"] + recall["t2i_r@1"]) / 2,
            ours_map,
        ]
    )
    assert average == {"average": pytest.approx(expected), "datasets": 3}
    report = (root / "eval" / "report.md").read_text()
    assert "## Suite average: custom" in report and "| generalist | " in report and "3 of 4" in report


def test_a_dataset_on_s3_reads_like_a_local_one(s3_endpoint, tmp_path):
    from mode_ray.config import S3Config
    from mode_ray.run_root.storage import get_fs

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

    from mode_ray.eval.assemble import task_data
    from mode_ray.eval.rows import with_suite_labels

    task = EvalTaskConfig(name="shapes", source="webdataset", location="x", label_field="cls", class_names=CLASSES)
    metas = [with_suite_labels(None, str(label).encode()) for label in (0, 3, 7, 9)]  # 7 and 9: no such class
    rows = pa.table({"key": list("abcd"), "meta": metas, "reason": [None] * 4})
    with pytest.raises(ValueError, match="a .cls label that is not an index.*classnames.txt does not match"):
        task_data(task, rows, [], ["{}"])
    multi = task.model_copy(update={"kind": "multilabel", "label_field": "npy"})
    vectors = [np.eye(len(CLASSES), dtype=np.int64)[0], np.ones(len(CLASSES) + 1, dtype=np.int64)]  # the 2nd: 5 of 4
    metas = []
    for v in vectors:
        buf = io.BytesIO()
        np.save(buf, v)
        metas.append(with_suite_labels(None, None, buf.getvalue()))
    metas.append(with_suite_labels(None, None, b"not an npy file"))
    rows = pa.table({"key": list("abc"), "meta": metas, "reason": [None] * 3})
    with pytest.raises(ValueError, match="2 samples have a .npy label that is not a vector with one entry per class"):
        task_data(multi, rows, [], ["{}"])


def test_retrieval_recall_and_multilabel_map_match_clip_benchmarks_own_functions():
    """Random scores, several captions per image: mode_ray's recall@k (CLIP_benchmark's semantics: every
    caption its own text) and mean average precision equal CLIP_benchmark's own metric functions."""
    import torch
    from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
    from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k as their_recall

    from mode_ray.eval.retrieval import build_corpus, recall_at_k
    from mode_ray.eval.zero_shot import mean_average_precision

    rng = np.random.default_rng(0)
    captions = [[f"image {i} caption {j}" for j in range(rng.integers(1, 4))] for i in range(40)]
    corpus = build_corpus(captions, merge_identical=False)
    scores = rng.normal(size=(40, len(corpus.texts)))
    ours = recall_at_k(scores, scores, corpus.pair_images, corpus.pair_texts, ks=(1, 5))
    positive = torch.zeros(len(corpus.texts), 40, dtype=torch.bool)  # theirs: [texts, images]
    positive[torch.as_tensor(corpus.pair_texts), torch.as_tensor(corpus.pair_images)] = True
    t2i = torch.as_tensor(scores.T)
    for k in (1, 5):
        assert ours[f"t2i_r@{k}"] == pytest.approx((their_recall(t2i, positive, k) > 0).float().mean().item())
        assert ours[f"i2t_r@{k}"] == pytest.approx((their_recall(t2i.T, positive.T, k) > 0).float().mean().item())
    # identical captions as one text: fewer texts, and a text matches every image it captions
    merged = build_corpus([["a cat"], ["a dog", "a cat"], ["a dog"]], merge_identical=True)
    assert merged.texts == ["a cat", "a dog"]
    assert list(zip(merged.pair_images, merged.pair_texts, strict=True)) == [(0, 0), (1, 0), (1, 1), (2, 1)]

    targets = (rng.random((60, 7)) < 0.3).astype(np.int64)
    targets[:, 6] = 0  # a class no image has: 0 in both
    logits = rng.normal(size=(60, 7))
    theirs = average_precision_per_class(torch.as_tensor(logits), torch.as_tensor(targets)).mean().item()
    assert mean_average_precision(logits, targets) == pytest.approx(theirs, abs=1e-6)  # theirs: float32


def test_a_named_suite_resolves_what_is_there_and_counts_what_is_not(tmp_path):
    from mode_ray.config import BenchmarkConfig
    from mode_ray.eval.benchmarks import SUITES
    from mode_ray.eval.suite import resolve_benchmark

    assert {name: len(entries) for name, entries in SUITES.items()} == {"mode-26": 26, "datacomp-38": 38}
    suite_dataset(tmp_path / "wds_vtab-dtd", n=4, shards=1)  # CLIP_benchmark's folder name
    suite_dataset(tmp_path / "wds_imagenet1k_test", n=4, shards=1)  # DataComp's download name
    suite_dataset(tmp_path / "wds_retrieval-flickr_1k_test_image_text_retrieval_test", 4, 1, kind="retrieval")
    suite_dataset(tmp_path / "wds_wilds-fmow_test", n=4, shards=1)
    suite = resolve_benchmark(BenchmarkConfig(root=str(tmp_path), datasets="datacomp-38"))
    assert [t.name for t in suite.tasks] == ["vtab/dtd", "imagenet1k", "flickr30k", "wilds/fmow"]
    assert suite.main_metrics == {"vtab/dtd": "accuracy", "imagenet1k": "accuracy", "flickr30k": "mean_recall@1"}
    assert suite.not_computed == {"wilds/fmow": "acc_worst_region"} and len(suite.missing) == 34
    with pytest.raises(ValueError, match=r"cars is not under .*wds_cars, wds_cars_test"):
        resolve_benchmark(BenchmarkConfig(root=str(tmp_path), datasets=["vtab/dtd", "cars"], missing="error"))
    with pytest.raises(ValueError, match="no suite named 'mode-27'"):
        resolve_benchmark(BenchmarkConfig(root=str(tmp_path), datasets="mode-27"))
    (tmp_path / "wds_vtab-dtd" / "classnames.txt").unlink()  # a folder that is there but broken: an error
    with pytest.raises(ValueError, match="classnames.txt is missing"):
        resolve_benchmark(BenchmarkConfig(root=str(tmp_path), datasets=["vtab/dtd"]))
