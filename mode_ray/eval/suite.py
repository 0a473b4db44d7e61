"""The standard zero-shot suite in CLIP_benchmark's webdataset layout, as eval tasks.

The suite behind the papers' tables (MoDE's 26 tasks, DataComp's 38) is distributed in the layout the
CLIP_benchmark tool reads (`wds_imagenet1k`, `wds_cars`, …). Per dataset folder:

    test/{0..n-1}.tar    KEY.webp|png|jpg and KEY.cls (an integer label; retrieval: KEY.txt, multilabel: KEY.npy)
    test/nshards.txt     n
    classnames.txt       one class name per line
    zeroshot_classification_templates.txt   one template per line, `{c}` where the class name goes
    dataset_type.txt     `retrieval` or `multilabel`; absent: classification

A task with `source: clip_benchmark` names such a folder (any fsspec URL); its class names, templates and type
come from the folder, and the task may still override names and templates. Plain file reads, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_ray.config import EvalTaskConfig, S3Config
from mode_ray.storage import exists, join, read_bytes

CLASSIFICATION, RETRIEVAL, MULTILABEL = "classification", "retrieval", "multilabel"
LABEL_FIELD = "cls"  # the label's member: KEY.cls, read into the sample's metadata under this name


@dataclass(frozen=True)
class SuiteDataset:
    root: str
    kind: str
    shards: list[str]
    class_names: list[str] | None
    templates: list[str] | None


def _lines(url: str, s3: S3Config | None) -> list[str]:
    return [line.strip() for line in read_bytes(url, s3).decode("utf-8").splitlines() if line.strip()]


def read_dataset(root: str, s3: S3Config | None = None, split: str = "test") -> SuiteDataset:
    """One dataset folder's metadata and shard URLs; a missing required file is an error naming it."""
    nshards_url = join(root, split, "nshards.txt")
    if not exists(nshards_url, s3):
        raise ValueError(f"{root} is not a dataset in CLIP_benchmark's layout: {nshards_url} is missing")
    try:
        nshards = int(read_bytes(nshards_url, s3).decode().strip())
    except ValueError:
        raise ValueError(f"{nshards_url} must hold the number of shards") from None
    type_url = join(root, "dataset_type.txt")
    kind = _lines(type_url, s3)[0].lower() if exists(type_url, s3) else CLASSIFICATION
    optional = {}
    for name, file in (("class_names", "classnames.txt"), ("templates", "zeroshot_classification_templates.txt")):
        url = join(root, file)
        optional[name] = _lines(url, s3) if exists(url, s3) else None
    shards = [join(root, split, f"{i}.tar") for i in range(nshards)]
    return SuiteDataset(root, kind, shards, **optional)


def as_webdataset_task(task: EvalTaskConfig, s3: S3Config | None = None) -> EvalTaskConfig:
    """A `clip_benchmark` task as the webdataset task mode_ray evaluates: the dataset's shards, its `.cls`
    label indexing its classnames.txt, its templates with `{c}` written as `{}`."""
    assert isinstance(task.location, str), "a clip_benchmark task names one dataset folder"
    data = read_dataset(task.location, s3)
    if data.kind != CLASSIFICATION:
        raise ValueError(
            f"task {task.name!r}: {task.location} is a {data.kind} dataset of the zero-shot suite; mode_ray "
            f"evaluates its classification datasets (image-caption retrieval: eval.shards)"
        )
    class_names = task.class_names or data.class_names
    if not class_names:
        raise ValueError(f"task {task.name!r}: {join(task.location, 'classnames.txt')} is missing or empty")
    templates = task.templates or [t.replace("{c}", "{}") for t in data.templates or []] or None
    for t in templates or []:
        if "{}" not in t:
            raise ValueError(f"task {task.name!r}: template {t!r} has no '{{c}}' for the class name")
    return EvalTaskConfig(
        name=task.name,
        source="webdataset",
        location=data.shards,
        label_field=LABEL_FIELD,
        class_names=class_names,
        templates=templates,
    )
