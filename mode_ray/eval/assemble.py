"""From featurised images and texts to the evaluation report (Ray-free): what `mode-ray eval` does once every
model has embedded the images (mode_ray/stages/evaluate.py, on Ray).

    featurised rows ─▶ each task's labelled images (TaskData), each retrieval set's images and captions
    + text features  ─▶ scores of every model, ensemble and control (scoring.py) ─▶ report files, summary.json,
                        each model card's report row, the accuracy tables on the console

The stage plans the run (EvalPlan: which models, tasks, suite, MoE), featurises on Ray (Features), then calls
`task_inputs` between the image and the text features and `write_results` at the end.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mode_ray.config import Config, EvalTaskConfig
from mode_ray.console.progress import StageLog, console, verbose
from mode_ray.eval import moe_usage
from mode_ray.eval.metrics import MEAN_AVERAGE_PRECISION, MEAN_PER_CLASS_RECALL
from mode_ray.eval.report import accuracy_table, best_routing, retrieval_table, routing_hit_rates, write_report
from mode_ray.eval.retrieval import Corpus, build_corpus
from mode_ray.eval.scoring import ENSEMBLE_MODELS, Scores, TaskData, merge, score_retrieval, score_task
from mode_ray.eval.suite import LABEL_FIELD, MULTI_LABEL_FIELD, MULTILABEL, RETRIEVAL, Suite, describe, summarize
from mode_ray.eval.tasks import SKIP_NO_LABEL, SKIP_UNKNOWN_LABEL, folder_classes, templates_of, webdataset_label
from mode_ray.models.card import write_card
from mode_ray.routing.router import TaskRouter
from mode_ray.run_root.compute import report_rows
from mode_ray.run_root.layout import MOE, RunPaths
from mode_ray.run_root.storage import join, write_json


@dataclass
class EvalPlan:
    """What one evaluation covers, settled before any image is read."""

    summary: dict[str, Any]  # experts/summary.json
    suite: Suite | None  # eval.benchmark, resolved once: its tasks are in `tasks`, its average is taken at the end
    tasks: list[EvalTaskConfig]  # the configured tasks (zero-shot and retrieval)
    corpus_task: EvalTaskConfig | None  # eval.shards' captions as the `retrieval` task
    moe: dict[str, Any] | None  # the MoE stage's summary when the run has a finished CLIP-MoE
    models: list[str]  # every model evaluated on its own: experts, baselines, the MoE
    present: list[int]  # the trained data experts' coarse clusters
    singles: list[str]  # the single models reported after the ensembles
    settings: str  # the stage's settings hash


@dataclass
class Featurized:
    """One image source's rows (key, meta, caption, txt, reason; a MoE's `u:` counts), sorted by key, and each
    model's image features, one row per row."""

    rows: pa.Table
    image_feats: dict[str, np.ndarray]


def source_key(task: EvalTaskConfig) -> str:
    """Tasks reading the same images share one featurised source."""
    return json.dumps([task.source, task.location])


@dataclass
class RetrievalData:
    """One retrieval task's usable images (each model's features, in corpus order) and its caption corpus."""

    name: str
    keys: list[str]
    corpus: Corpus
    image_feats: dict[str, np.ndarray]
    skipped: dict[str, int]


@dataclass
class Features:
    """Everything the models computed: per source its featurised rows; the tasks and retrieval sets read from
    them; per model its class-text features per task and its caption features per retrieval set; per MoE its
    text tower's expert counts."""

    sources: dict[str, Featurized]
    data: list[TaskData]
    corpora: list[RetrievalData]
    per_task: dict[str, dict[str, np.ndarray]]
    per_caption: dict[str, dict[str, np.ndarray]]
    text_usage: dict[str, moe_usage.Counts]


# --------------------------------------------------------------------------- rows → tasks


def task_data(
    task: EvalTaskConfig, rows: pa.Table, image_feats: dict[str, np.ndarray], default_templates: list[str]
) -> TaskData:
    """One zero-shot task's labelled images out of its source's rows; images without a usable label or image
    are counted per reason. `image_feats`: each model's features of every row."""
    metas = [json.loads(m) if m else None for m in rows["meta"].to_pylist()]
    reasons = rows["reason"].to_pylist()
    if task.source == "folder":
        class_dirs = sorted({m["class_dir"] for m in metas})
        class_names = folder_classes(class_dirs, task)
        index = {d: i for i, d in enumerate(class_dirs)}
        labels = [(index[m["class_dir"]], None) for m in metas]
    else:
        class_names = list(task.class_names or [])
        labels = [webdataset_label(m, task) for m in metas]
    skipped: Counter[str] = Counter()
    keep = []
    for i, ((_, why), reason) in enumerate(zip(labels, reasons, strict=True)):
        if why == SKIP_NO_LABEL:
            continue  # not a sample of this task (shards shared by several tasks)
        if why or reason:
            skipped[why or reason] += 1
        else:
            keep.append(i)
    _check_suite_labels(task, skipped, class_names)
    idx = np.array(keep, dtype=np.int64)
    label_array = np.array([labels[i][0] for i in idx], dtype=np.int64)
    if task.kind == MULTILABEL:
        label_array = label_array.reshape(len(idx), len(class_names))
    return TaskData(
        name=task.name,
        class_names=class_names,
        templates=templates_of(task, default_templates),
        keys=rows["key"].take(idx).to_pylist(),
        labels=label_array,
        image_feats={m: image_feats[m][idx] for m in image_feats},
        skipped=dict(skipped),
    )


def _check_suite_labels(task: EvalTaskConfig, skipped: Counter[str], class_names: list[str]) -> None:
    """A suite's `.cls`/`.npy` label that fits no class is the dataset's error, not a sample to skip."""
    if task.label_field in (LABEL_FIELD, MULTI_LABEL_FIELD) and skipped.get(SKIP_UNKNOWN_LABEL):
        what = "a .cls label that is not an index into" if task.label_field == LABEL_FIELD else (
            "a .npy label that is not a vector with one entry per class of")  # fmt: skip
        raise ValueError(
            f"task {task.name!r}: {skipped[SKIP_UNKNOWN_LABEL]} samples have {what} its {len(class_names)} class "
            "names: the dataset's classnames.txt does not match its labels"
        )


def retrieval_data(
    task: EvalTaskConfig,
    rows: pa.Table,
    image_feats: dict[str, np.ndarray],
    txt_lines: bool,
    limit: int | None = None,
) -> RetrievalData | None:
    """The usable images with at least one caption — KEY.txt's lines (`txt_lines`: the suite's layout) or else
    the sample's caption — the first `limit` of them; images without one are counted. None: no caption at all."""
    keep, captions, skipped = [], [], Counter()
    for i, row in enumerate(rows.select(["caption", "txt", "reason"]).to_pylist()):
        lines = [line.strip() for line in (row["txt"] or "").splitlines() if line.strip()] if txt_lines else []
        lines = lines or ([row["caption"]] if row["caption"] else [])
        if row["reason"] or not lines:
            skipped[row["reason"] or "no_caption"] += 1
        else:
            keep.append(i)
            captions.append(lines)
    if not keep:
        return None
    idx = np.array(keep[:limit], dtype=np.int64)
    return RetrievalData(
        name=task.name,
        keys=rows["key"].take(idx).to_pylist(),
        corpus=build_corpus(captions[:limit], task.merge_identical_captions),
        image_feats={m: image_feats[m][idx] for m in image_feats},
        skipped=dict(skipped),
    )


def task_inputs(
    cfg: Config, plan: EvalPlan, sources: dict[str, Featurized], log: StageLog
) -> tuple[list[TaskData], list[RetrievalData]]:
    """The zero-shot tasks and the retrieval sets (eval.shards' corpus last), read from the featurised sources."""
    data, corpora = [], []
    for task in plan.tasks:
        source = sources[source_key(task)]
        if task.kind == RETRIEVAL:
            found = retrieval_data(task, source.rows, source.image_feats, txt_lines=True)
            if found is None:
                raise ValueError(f"retrieval task {task.name!r}: no usable image with a caption")
            corpora.append(found)
        else:
            data.append(task_data(task, source.rows, source.image_feats, cfg.eval.templates))
    if plan.corpus_task is not None:
        source = sources[source_key(plan.corpus_task)]
        limit = cfg.eval.max_retrieval_texts
        corpus = retrieval_data(plan.corpus_task, source.rows, source.image_feats, False, limit)
        if corpus is None:  # label-only shards (a classification set): nothing to retrieve, said once
            log.info(f"no captions in eval.shards={cfg.eval.shards}: no retrieval corpus, no retrieval rows")
        else:
            corpora.append(corpus)
    return data, corpora


# --------------------------------------------------------------------------- scores → report


def score_all(plan: EvalPlan, features: Features, router: TaskRouter) -> Scores:
    """Every model, ensemble and control on every task and retrieval set."""
    models, present, singles = plan.models, plan.present, plan.singles
    parts = [
        score_task(d, {m: features.per_task[m][d.name] for m in models}, router, present, singles)
        for d in features.data
    ]
    for c in features.corpora:
        text_feats = {m: features.per_caption[m][c.name] for m in models}
        parts.append(score_retrieval(c.name, c.corpus, c.image_feats, text_feats, router, present, singles))
    return merge(parts)


def log_routing(scores: Scores, log: StageLog) -> None:
    """The routing weights per task (also in the report), with --verbose."""
    for r in scores.routing if verbose() else []:
        log.info(
            f"routing {r['task']}/{r['method']}: [{', '.join(f'{w:.3f}' for w in r['weights'])}], "
            f"{r['distance_from_uniform']:.3f} from uniform; label→centre d mean {r['distance_mean']:.3f} "
            f"[{r['distance_min']:.3f}, {r['distance_max']:.3f}]"
        )


def report_header(cfg: Config, features: Features, router: TaskRouter) -> dict[str, Any]:
    """The report's header: the run, the tasks and what was skipped of them, retrieval, routing."""
    data, corpora = features.data, features.corpora
    skipped = {d.name: d.skipped for d in [*data, *corpora] if d.skipped}
    return {
        "run_root": cfg.run_root,
        "tasks": ", ".join(f"{d.name} ({len(d.labels)} images, {len(d.class_names)} classes)" for d in data),
        "skipped images": skipped or "none",
        "retrieval": ", ".join(f"{c.name} ({len(c.keys)} images, {len(c.corpus.texts)} texts)" for c in corpora)
        or "off",
        "routing": cfg.eval.routing.model_dump(),
        "routing encoder": router.encoder_id,
        "reference router centres": router.reference_centres,
    }


def moe_usage_record(plan: EvalPlan, features: Features) -> dict[str, Any] | None:
    """The CLIP-MoE's expert usage over every evaluation image and the class prompts; None without a MoE."""
    if plan.moe is None:
        return None
    image_usage: moe_usage.Counts = {}
    for source in features.sources.values():
        image_usage = moe_usage.add(image_usage, moe_usage.column_counts(source.rows, f"u:{MOE}"))
    return moe_usage.usage_record(image_usage, features.text_usage[MOE], MOE)


def write_results(cfg: Config, plan: EvalPlan, features: Features, router: TaskRouter, log: StageLog) -> dict[str, Any]:
    """Score everything, write the report files and eval/summary.json, give each trained model's card its
    report row; returns the summary."""
    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    scores = score_all(plan, features, router)
    log_routing(scores, log)
    header = report_header(cfg, features, router)
    suite_result = summarize(plan.suite, scores.metrics) if plan.suite is not None else None
    if plan.suite is not None:
        header["suite"] = describe(plan.suite)
        log.info(f"suite {header['suite']}")
    usage = moe_usage_record(plan, features)
    trained = {m: plan.summary["models"][m] for m in plan.models if m in plan.summary["models"]}
    compute = report_rows(plan.summary, ENSEMBLE_MODELS, plan.moe, MOE)
    files = write_report(paths.eval, scores, compute, header, s3, usage, trained, suite_result)
    tasks_order, table = accuracy_table(scores.metrics)
    result = {
        "files": files,
        "accuracy": table,
        "mean_per_class_recall": accuracy_table(scores.metrics, MEAN_PER_CLASS_RECALL)[1],
        "mean_average_precision": accuracy_table(scores.metrics, MEAN_AVERAGE_PRECISION)[1],
        "retrieval": retrieval_table(scores.metrics),
        "tasks": tasks_order,
        "header": header,
        "routing_hit_rate": routing_hit_rates(scores.routing),
        "best_routing": best_routing(table),
        "suite": suite_result,
    }
    write_json(join(paths.eval, "summary.json"), result, s3)
    for name in (m for m in table if m in plan.models):  # each trained model's card gets its report row
        write_card(cfg, name, table[name])
    return result


def print_accuracy(result: dict[str, Any]) -> None:
    from rich.table import Table

    tasks = result["tasks"]
    table = Table(title="zero-shot accuracy (%)")
    for col in ("model", *tasks, "average"):
        table.add_column(col)
    for model, row in result["accuracy"].items():
        table.add_row(model, *(f"{100 * row[t]:.1f}" for t in [*tasks, "average"]))
    console.print(table)
    suite = result.get("suite")
    if suite:
        table = Table(title=f"suite average (%): {suite['name']}, main metric of each dataset")
        for col in ("model", "average", "datasets"):
            table.add_column(col)
        for model, row in suite["average"].items():
            table.add_row(model, f"{100 * row['average']:.1f}", f"{row['datasets']} of {suite['size']}")
        console.print(table)
