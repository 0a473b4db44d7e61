"""Named zero-shot suites (`eval.benchmark.datasets: mode-26 | datacomp-38`) and their average.

Each dataset is named as CLIP_benchmark names it (`vtab/dtd`) and found under the benchmark root as
CLIP_benchmark's Hugging Face copies are named (`wds_vtab-dtd`) or as DataComp's download script names them
(`wds_vtab-dtd_test`). The suite average is the mean of each dataset's main metric — the number the papers'
tables average — over the datasets that were evaluated and whose main metric mode_ray computes; the report
names the rest.

Sources. datacomp-38: DataComp's tasklist.yml (mlfoundations/datacomp): its 38 scored tasks and main metrics
(acc1 unless named; its two retrieval sets are the Flickr30k 1k and MSCOCO 5k test splits, which CLIP_benchmark
ships as wds_flickr30k and wds_mscoco_captions). mode-26: the 26 tasks of the MoDE paper's tables, which follow
MetaCLIP's (CLIP's zero-shot suite without Birdsnap and VOC, with CUB); the reference code does not ship its
evaluation, so the per-dataset metric follows CLIP's paper convention (mean per-class recall for Aircraft,
Pets, Caltech-101, Flowers; ROC AUC for Hateful Memes, which mode_ray does not compute). CUB, UCF101,
Kinetics700 and Hateful Memes are not in CLIP_benchmark's webdataset collection: lay them out yourself
(wds_cub/, … in the same layout) or they are counted as missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mode_ray.eval.metrics import ACCURACY, MEAN_AVERAGE_PRECISION, MEAN_PER_CLASS_RECALL, MEAN_RECALL_AT_1

COMPUTED = (ACCURACY, MEAN_PER_CLASS_RECALL, MEAN_RECALL_AT_1, MEAN_AVERAGE_PRECISION)


@dataclass(frozen=True)
class SuiteEntry:
    name: str  # CLIP_benchmark's dataset name, and the task's name in the report
    main_metric: str
    extra_folders: tuple[str, ...] = ()

    @property
    def folders(self) -> tuple[str, ...]:
        slug = self.name.replace("/", "-")
        return (f"wds_{slug}", f"wds_{slug}_test", *self.extra_folders)


def _entries(spec: str, metrics: dict[str, str], extra: dict[str, tuple[str, ...]] | None = None) -> list[SuiteEntry]:
    return [SuiteEntry(n, metrics.get(n, ACCURACY), (extra or {}).get(n, ())) for n in spec.split()]


MPCR = MEAN_PER_CLASS_RECALL
SUITES: dict[str, list[SuiteEntry]] = {
    "mode-26": _entries(
        "imagenet1k food101 cifar10 cifar100 cub sun397 cars fgvc_aircraft vtab/dtd vtab/pets vtab/caltech101 "
        "vtab/flowers mnist fer2013 stl10 vtab/eurosat vtab/resisc45 gtsrb vtab/kitti_closest_vehicle_distance "
        "country211 vtab/pcam ucf101 kinetics700 vtab/clevr_count_all hateful_memes renderedsst2",
        {
            "fgvc_aircraft": MPCR,
            "vtab/pets": MPCR,
            "vtab/caltech101": MPCR,
            "vtab/flowers": MPCR,
            "hateful_memes": "roc_auc",
        },
        {"vtab/dtd": ("wds_dtd",), "vtab/flowers": ("wds_flowers",)},
    ),  # fmt: skip
    "datacomp-38": _entries(
        "vtab/caltech101 cifar10 vtab/cifar100 vtab/clevr_count_all vtab/clevr_closest_object_distance "
        "country211 vtab/dtd vtab/eurosat fgvc_aircraft food101 gtsrb imagenet1k imagenet_sketch imagenetv2 "
        "imagenet-a imagenet-o imagenet-r vtab/kitti_closest_vehicle_distance mnist objectnet vtab/flowers "
        "vtab/pets voc2007 vtab/pcam renderedsst2 vtab/resisc45 cars stl10 sun397 vtab/svhn flickr30k "
        "mscoco_captions misc/winogavil wilds/iwildcam wilds/camelyon17 wilds/fmow fairness/dollar_street "
        "fairness/geode",
        {
            "vtab/caltech101": MPCR,
            "fgvc_aircraft": MPCR,
            "vtab/flowers": MPCR,
            "vtab/pets": MPCR,
            "flickr30k": MEAN_RECALL_AT_1,
            "mscoco_captions": MEAN_RECALL_AT_1,
            "misc/winogavil": "jaccard_score_10-12",
            "wilds/iwildcam": "F1-macro_all",
            "wilds/fmow": "acc_worst_region",
            "fairness/dollar_street": "acc_top5_wg",
            "fairness/geode": "acc_wg",
        },
        {
            "flickr30k": ("wds_retrieval-flickr_1k_test_image_text_retrieval_test",),
            "mscoco_captions": ("wds_retrieval-mscoco_2014_5k_test_image_text_retrieval_test",),
            "fairness/dollar_street": ("wds_dollar_street_test",),
            "fairness/geode": ("wds_geode_test",),
        },
    ),  # fmt: skip
}


def suite_entries(datasets: str | list[str]) -> list[SuiteEntry]:
    """A named suite's entries, or entries for a list of dataset names (their main metric: top-1, or
    recall@1 for a retrieval set, decided once its dataset_type.txt is read)."""
    if isinstance(datasets, str):
        if datasets not in SUITES:
            raise ValueError(f"eval.benchmark.datasets: no suite named {datasets!r} (known: {', '.join(SUITES)})")
        return SUITES[datasets]
    return [SuiteEntry(name, "") for name in datasets]


def metric_value(rows: dict[tuple[str, str], float], task: str, metric: str) -> float | None:
    """A task's value of a main metric from (task, metric) → value; None when it was not computed."""
    if metric == MEAN_RECALL_AT_1:
        parts = [rows.get((task, m)) for m in ("i2t_r@1", "t2i_r@1")]
        return None if None in parts else (parts[0] + parts[1]) / 2  # type: ignore[operator]
    return rows.get((task, metric))


def suite_average(metrics: list[dict[str, Any]], main_metrics: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per model: the mean main metric over the suite's evaluated datasets, and how many it covers."""
    by_model: dict[str, dict[tuple[str, str], float]] = {}
    for m in metrics:
        by_model.setdefault(m["model"], {})[(m["task"], m["metric"])] = m["value"]
    out = {}
    for model, rows in by_model.items():
        values = {t: metric_value(rows, t, metric) for t, metric in main_metrics.items()}
        scored = [v for v in values.values() if v is not None and not math.isnan(v)]
        out[model] = {"average": sum(scored) / len(scored) if scored else math.nan, "datasets": len(scored)}
    return out
