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

from dataclasses import dataclass, field
from typing import Any

from mode_ray.config import BenchmarkConfig, EvalTaskConfig, S3Config
from mode_ray.eval.benchmarks import COMPUTED, suite_average, suite_entries
from mode_ray.eval.metrics import ACCURACY, MEAN_AVERAGE_PRECISION, MEAN_RECALL_AT_1
from mode_ray.run_root.storage import exists, join, read_bytes

CLASSIFICATION, RETRIEVAL, MULTILABEL = "classification", "retrieval", "multilabel"
KINDS = (CLASSIFICATION, RETRIEVAL, MULTILABEL)
LABEL_FIELD = "cls"  # the label's member: KEY.cls, read into the sample's metadata under this name
MULTI_LABEL_FIELD = "npy"  # a multi-label set's KEY.npy (a 0/1 vector over the classes), likewise
DEFAULT_METRIC = {CLASSIFICATION: ACCURACY, RETRIEVAL: MEAN_RECALL_AT_1, MULTILABEL: MEAN_AVERAGE_PRECISION}


@dataclass(frozen=True)
class SuiteDataset:
    root: str
    kind: str
    shards: list[str]
    class_names: list[str] | None
    templates: list[str] | None


@dataclass
class Suite:
    """eval.benchmark resolved: the tasks to run, each one's main metric, and what the average leaves out."""

    name: str
    size: int
    tasks: list[EvalTaskConfig] = field(default_factory=list)
    main_metrics: dict[str, str] = field(default_factory=dict)  # task → the metric the average takes
    missing: list[str] = field(default_factory=list)  # no folder under the root
    not_computed: dict[str, str] = field(default_factory=dict)  # evaluated, but the main metric is not ours


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
    kind = (_lines(type_url, s3) or [CLASSIFICATION])[0].lower() if exists(type_url, s3) else CLASSIFICATION
    if kind not in KINDS:
        raise ValueError(f"{type_url} says {kind!r}; CLIP_benchmark's types are {', '.join(KINDS[1:])} or none")
    optional = {}
    for name, file in (("class_names", "classnames.txt"), ("templates", "zeroshot_classification_templates.txt")):
        url = join(root, file)
        optional[name] = _lines(url, s3) if exists(url, s3) else None
    shards = [join(root, split, f"{i}.tar") for i in range(nshards)]
    return SuiteDataset(root, kind, shards, **optional)


def as_webdataset_task(task: EvalTaskConfig, s3: S3Config | None = None) -> EvalTaskConfig:
    """A `clip_benchmark` task as the webdataset task mode_ray evaluates: the dataset's shards; for a
    classification set its `.cls` label indexing classnames.txt (a multi-label set: its `.npy` vector over
    them), its templates with `{c}` written as `{}`; for a retrieval set, each image's KEY.txt lines."""
    assert isinstance(task.location, str), "a clip_benchmark task names one dataset folder"
    data = read_dataset(task.location, s3)
    if task.kind and task.kind != data.kind:
        raise ValueError(f"task {task.name!r}: kind {task.kind!r}, but {task.location} is a {data.kind} dataset")
    if data.kind == RETRIEVAL:
        return EvalTaskConfig(
            name=task.name,
            source="webdataset",
            location=data.shards,
            kind=RETRIEVAL,
            merge_identical_captions=task.merge_identical_captions,
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
        kind=data.kind,
        label_field=MULTI_LABEL_FIELD if data.kind == MULTILABEL else LABEL_FIELD,
        class_names=class_names,
        templates=templates,
    )


def resolve_benchmark(benchmark: BenchmarkConfig | None, s3: S3Config | None = None) -> Suite | None:
    """Each dataset of the suite found under the root (a missing one skipped or an error, as configured)."""
    if benchmark is None:
        return None
    entries = suite_entries(benchmark.datasets)
    name = benchmark.datasets if isinstance(benchmark.datasets, str) else "custom"
    suite = Suite(name=name, size=len(entries))
    for entry in entries:
        folder = next((join(benchmark.root, f) for f in entry.folders if exists(join(benchmark.root, f), s3)), None)
        if folder is None:
            if benchmark.missing == "error":
                tried = ", ".join(entry.folders)
                raise ValueError(f"eval.benchmark: {entry.name} is not under {benchmark.root} (looked for {tried})")
            suite.missing.append(entry.name)
            continue
        task = as_webdataset_task(EvalTaskConfig(name=entry.name, source="clip_benchmark", location=folder), s3)
        metric = entry.main_metric or DEFAULT_METRIC[task.kind or CLASSIFICATION]
        suite.tasks.append(task)
        if metric in COMPUTED:
            suite.main_metrics[entry.name] = metric
        else:
            suite.not_computed[entry.name] = metric
    return suite


def summarize(suite: Suite, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite as the report and summary.json show it: per model the mean main metric, and what it covers."""
    return {
        "name": suite.name,
        "size": suite.size,
        "main_metrics": suite.main_metrics,
        "missing": suite.missing,
        "not_computed": suite.not_computed,
        "average": suite_average(metrics, suite.main_metrics),
    }


def describe(suite: Suite) -> str:
    """One line for the report's header and the console: what the suite average covers."""
    line = f"{suite.name}: {len(suite.tasks)} of {suite.size} datasets evaluated"
    if suite.missing:
        line += f"; missing (no folder): {', '.join(suite.missing)}"
    if suite.not_computed:
        line += "; main metric not computed by mode_ray (left out of the average): " + ", ".join(
            f"{t} ({m})" for t, m in suite.not_computed.items()
        )
    return line
