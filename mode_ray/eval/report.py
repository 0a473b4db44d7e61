"""The evaluation report: report.csv (long form), report.md (readable tables), report.png (plots),
plus what it was computed from — predictions.parquet, logits.npz and routing.json — so every number can
be recomputed without the models; with a CLIP-MoE, also its expert usage: moe_usage.{json,png}."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mode_ray.config import S3Config
from mode_ray.eval import moe_usage
from mode_ray.eval.metrics import MEAN_AVERAGE_PRECISION, MEAN_PER_CLASS_RECALL
from mode_ray.eval.plots import png_bytes, share_heatmap
from mode_ray.eval.scoring import ALL_UNIT, EXPERT_MAX, METHODS, RETRIEVAL_TASK, Scores, ensemble_name
from mode_ray.run_root.layout import MOE
from mode_ray.run_root.names import GENERALIST, MATCHED, expert_name
from mode_ray.run_root.storage import join, write_bytes, write_json

CSV_COLUMNS = [
    "model",
    "kind",
    "task",
    "metric",
    "value",
    "n",
    "trained_samples",
    "compute_samples",
    "train_seconds",
    "note",
]
RETRIEVAL_SHOWN = ("i2t_r@1", "t2i_r@1", "i2t_r@5", "t2i_r@5")


def with_compute(metrics: list[dict[str, Any]], compute: dict[str, dict[str, int]]) -> list[dict[str, Any]]:
    return [{**m, **compute.get(m["model"], {})} for m in metrics]


def models_in_order(metrics: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(m["model"] for m in metrics))


def accuracy_table(
    metrics: list[dict[str, Any]], metric: str = "accuracy"
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(task names, model → {task: value, 'average': mean over tasks}) of one classification metric."""
    acc = [m for m in metrics if m["metric"] == metric]
    tasks = list(dict.fromkeys(m["task"] for m in acc))
    table: dict[str, dict[str, float]] = {}
    for m in acc:
        table.setdefault(m["model"], {})[m["task"]] = m["value"]
    for row in table.values():
        row["average"] = float(np.mean([row[t] for t in tasks])) if tasks else math.nan
    return tasks, table


def best_routing(table: dict[str, dict[str, float]]) -> str | None:
    """The routing method whose ensemble has the best average zero-shot accuracy in this report (what the
    try-it page opens with; the served default stays `eval.routing.method`). None without a scored ensemble."""
    scored = {m: table[ensemble_name(m)]["average"] for m in METHODS if ensemble_name(m) in table}
    scored = {m: v for m, v in scored.items() if not math.isnan(v)}
    return max(scored, key=scored.__getitem__) if scored else None


def retrieval_table(metrics: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """model → retrieval task → {recall metric: value}."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for m in metrics:
        if m["metric"] in RETRIEVAL_SHOWN:
            table.setdefault(m["model"], {}).setdefault(m["task"], {})[m["metric"]] = m["value"]
    return table


def _csv(metrics: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(metrics)
    return buf.getvalue().encode()


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}" if pct else f"{value:,}"


def markdown(
    metrics: list[dict[str, Any]],
    routing: list[dict[str, Any]],
    header: dict[str, Any],
    usage: dict[str, Any] | None = None,
    suite: dict[str, Any] | None = None,
) -> str:
    picks = {m["task"]: m["note"] for m in metrics if m["model"] == EXPERT_MAX and m.get("note")}
    lines = [f"# Evaluation report — {header['run_root']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "run_root"]
    lines += _accuracy_lines(metrics)
    lines += _metric_lines(metrics, MEAN_PER_CLASS_RECALL, "Mean per-class recall (%), as CLIP_benchmark reports it "
                           "for imbalanced sets:")  # fmt: skip
    lines += _metric_lines(metrics, MEAN_AVERAGE_PRECISION, "Mean average precision (%), the multi-label tasks:")
    lines += _suite_lines(suite)
    if picks:
        lines += ["", f"{EXPERT_MAX} picks, per task: " + ", ".join(f"{t} → {e}" for t, e in picks.items()) + "."]
    lines += [
        "",
        f"`{ALL_UNIT}`: uniform average of the experts. `{EXPERT_MAX}`: the best single expert per task — an oracle. "
        f"`{GENERALIST}`: the seed continued for one tail on all data (the dense baseline); `{MATCHED}`: "
        "the seed continued for one tail per expert, so its compute equals the ensemble's.",
        "Training compute counts every sample a model's training processed and the seconds spent learning "
        "(forward, backward, step), the seed's included (the ensemble pays for the seed and every expert).",
        *_moe_lines(metrics),
        *_hit_rate_lines(routing),
    ]
    lines += _routing_lines(routing)
    if usage is not None:
        lines += moe_usage.markdown_lines(usage)
    return "\n".join(lines) + "\n"


def _accuracy_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """The main table: per model, accuracy per task and on average, the retrieval recalls, and what the model
    cost (samples behind its weights, training compute in samples and seconds)."""
    tasks, table = accuracy_table(metrics)
    retrieval = {(m["model"], m["task"], m["metric"]): m["value"] for m in metrics if m["metric"] in RETRIEVAL_SHOWN}
    shown = list(dict.fromkeys((k[1], k[2]) for k in retrieval))  # (task, metric), in report order
    compute = {
        m["model"]: (m.get("trained_samples"), m.get("compute_samples"), m.get("train_seconds")) for m in metrics
    }
    lines = ["", "## Zero-shot accuracy (%) and retrieval recall (%)", ""]
    recall_cols = [metric if task == RETRIEVAL_TASK else f"{task} {metric}" for task, metric in shown]
    cols = ["model", *tasks, "average", *recall_cols, "samples behind the weights", "training compute (samples)"]
    cols.append("(s)")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for model in models_in_order(metrics):
        row = table.get(model, {})
        seen, cost, seconds = compute.get(model, (None, None, None))
        cells = [model + (" (oracle)" if model == EXPERT_MAX else "")]
        cells += [_fmt(row.get(t)) for t in [*tasks, "average"]]
        cells += [_fmt(retrieval.get((model, task, metric))) for task, metric in shown]
        cells += [_fmt(seen, pct=False), _fmt(cost, pct=False), "–" if seconds is None else f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _routing_lines(routing: list[dict[str, Any]]) -> list[str]:
    """The routing weights of every task and method, with their distances and the routing hit."""
    lines = [
        "",
        "## Routing weights per task",
        "",
        "Distance from uniform is the total-variation distance (0 = all_unit, 1 − 1/E = one expert). "
        "d = L2 distance of each label to its nearest fine centre (the reference's input).",
        "",
    ]
    n_experts = len(routing[0]["weights"]) if routing else 0
    cols = ["task", "method", *[f"e{e}" for e in range(n_experts)], "from uniform", "d mean [min, max]", "labels → e"]
    cols += ["top expert", "expert-max pick", "hit"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in routing:
        cells = [r["task"], r["method"], *[f"{w:.3f}" for w in r["weights"]], f"{r['distance_from_uniform']:.3f}"]
        cells += [f"{r['distance_mean']:.3f} [{r['distance_min']:.3f}, {r['distance_max']:.3f}]"]
        cells += [" ".join(str(c) for c in r["label_expert_counts"])]
        cells += [
            r.get("top_expert", "–"),
            r.get("expert_max_pick", "–"),
            {True: "yes", False: "no"}.get(r.get("hit"), "–"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _metric_lines(metrics: list[dict[str, Any]], metric: str, title: str) -> list[str]:
    """One more per-task metric (CLIP_benchmark's other numbers), one row per model."""
    tasks, table = accuracy_table(metrics, metric)
    if not table:
        return []
    lines = ["", title, ""]
    lines += ["| model | " + " | ".join([*tasks, "average"]) + " |", "|" + "---|" * (len(tasks) + 2)]
    for model in models_in_order(metrics):
        if model in table:
            lines.append(f"| {model} | " + " | ".join(_fmt(table[model].get(t)) for t in [*tasks, "average"]) + " |")
    return lines


def _suite_lines(suite: dict[str, Any] | None) -> list[str]:
    """The suite average as the papers' tables read: each dataset's main metric, averaged."""
    if not suite:
        return []
    metrics = ", ".join(f"{t}: {m}" for t, m in suite["main_metrics"].items())
    lines = ["", f"## Suite average: {suite['name']}", "", f"Main metric per dataset: {metrics}."]
    if suite["missing"]:
        lines.append(f"Missing (no folder under the root, not in the average): {', '.join(suite['missing'])}.")
    if suite["not_computed"]:
        left = ", ".join(f"{t} ({m})" for t, m in suite["not_computed"].items())
        lines.append(f"Evaluated, but their main metric is not one mode_ray computes (not in the average): {left}.")
    lines += ["", "| model | average (%) | datasets |", "|---|---|---|"]
    for model, row in suite["average"].items():
        lines.append(f"| {model} | {_fmt(row['average'])} | {row['datasets']} of {suite['size']} |")
    return lines


def _moe_lines(metrics: list[dict[str, Any]]) -> list[str]:
    if not any(m["model"] == MOE for m in metrics):
        return []
    return [
        f"`{MOE}`: the CLIP-MoE upcycled from the generalist (MCL stages as experts, then router fine-tuning), "
        "one model, not part of the ensembles; its compute counts the base's training, the stages and the router."
    ]


def routing_hit_rates(routing: list[dict[str, Any]]) -> dict[str, float]:
    """Per routing method: the share of tasks whose heaviest expert is (as good as) the expert-max pick."""
    hits: dict[str, list[bool]] = {}
    for r in routing:
        if "hit" in r:
            hits.setdefault(r["method"], []).append(r["hit"])
    return {method: float(np.mean(h)) for method, h in hits.items()}


def _hit_rate_lines(routing: list[dict[str, Any]]) -> list[str]:
    rates = routing_hit_rates(routing)
    if not rates:
        return []
    shown = ", ".join(f"{m} {100 * v:.0f}%" for m, v in rates.items())
    return ["", f"Routing hit rate (top-weighted expert = the expert-max pick, over the zero-shot tasks): {shown}."]


def plot(metrics: list[dict[str, Any]], routing: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, table = accuracy_table(metrics)
    models = [m for m in models_in_order(metrics) if m in table]
    fig, (ax_acc, ax_w) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [2.2, 1]})
    columns = [*tasks, "average"]
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(columns))
    cmap = plt.get_cmap("tab20")
    for i, model in enumerate(models):
        values = [100 * table[model].get(c, np.nan) for c in columns]
        ax_acc.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model, color=cmap(i % 20))
    ax_acc.set_xticks(x, columns)
    ax_acc.set_ylabel("zero-shot accuracy (%)")
    ax_acc.set_title("accuracy per task and model")
    ax_acc.legend(fontsize=7, ncol=2)
    if routing:
        weights = np.array([r["weights"] for r in routing])
        rows = [f"{r['task']} / {r['method']}" for r in routing]
        columns = [expert_name(e) for e in range(weights.shape[1])]
        share_heatmap(fig, ax_w, weights, rows, columns, "routing weights", fontsize=6)
    return png_bytes(fig)


def training_curves(models: dict[str, dict[str, Any]]) -> bytes:
    """Training loss against samples seen (the seed's included where a model continues it), every model of
    the run on one plot: the curves TensorBoard shows live, kept with the report."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("tab10")
    for i, (name, m) in enumerate(models.items()):
        points = m.get("loss_history") or []
        samples = [p["step"] * m["batch_size"] for p in points]  # steps count from the schedule's start
        ax.plot(samples, [p["loss"] for p in points], label=name, color=cmap(i % 10), lw=1.2)
    ax.set_xlabel("samples seen")
    ax.set_ylabel("training loss (CLIP)")
    ax.set_title("training curves")
    ax.legend(fontsize=8)
    return png_bytes(fig)


def write_report(
    out_dir: str,
    scores: Scores,
    compute: dict[str, dict[str, int]],
    header: dict[str, Any],
    s3: S3Config | None = None,
    usage: dict[str, Any] | None = None,
    trained: dict[str, dict[str, Any]] | None = None,
    suite: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Every report file; `usage`: the CLIP-MoE's expert usage record (moe_usage.usage_record), if any;
    `trained`: each trained model's metrics.json (their training curves); `suite`: eval.benchmark's average."""
    metrics = with_compute(scores.metrics, compute)
    files = {
        "csv": join(out_dir, "report.csv"),
        "md": join(out_dir, "report.md"),
        "png": join(out_dir, "report.png"),
        "predictions": join(out_dir, "predictions.parquet"),
        "logits": join(out_dir, "logits.npz"),
        "routing": join(out_dir, "routing.json"),
    }
    write_bytes(files["csv"], _csv(metrics), s3)
    write_bytes(files["md"], markdown(metrics, scores.routing, header, usage, suite).encode(), s3)
    write_bytes(files["png"], plot(metrics, scores.routing), s3)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(scores.predictions), buf)
    write_bytes(files["predictions"], buf.getvalue(), s3)
    buf = io.BytesIO()
    np.savez_compressed(buf, **scores.arrays)
    write_bytes(files["logits"], buf.getvalue(), s3)
    write_json(files["routing"], scores.routing, s3)
    if trained:
        files["training_curves"] = join(out_dir, "training_curves.png")
        write_bytes(files["training_curves"], training_curves(trained), s3)
    if usage is not None:
        files["moe_usage"], files["moe_usage_png"] = join(out_dir, "moe_usage.json"), join(out_dir, "moe_usage.png")
        write_json(files["moe_usage"], usage, s3)
        write_bytes(files["moe_usage_png"], moe_usage.plot(usage), s3)
    return files
