"""The CLIP-MoE in the evaluation: whether a run has one, and which experts it uses — per tower and MoE block,
the share of routed token slots each expert received → eval/moe_usage.json, eval/moe_usage.png and a table
per tower in report.md.

How the counts travel: `track_usage` makes every MoE layer add its top-k picks to a counter while the model
embeds. The image tower embeds inside the Ray Data actor, batch after batch: each batch's raw counts come
back in a small JSON column `u:{model}` (in the batch's first row, null in the others) and the driver adds
them up. The text tower embeds the class prompts in one Ray task, which returns its counts with the features.
Counts, not shares, travel, so batches of any size add up exactly; shares are taken once, at the end.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from mode_ray.config import S3Config
from mode_ray.eval.plots import png_bytes, share_heatmap
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.storage import exists, join, read_json

Counts = dict[str, dict[str, list[float]]]  # {tower: {block index: [routed slots per expert]}}


def trained_moe(paths: RunPaths, s3: S3Config | None = None) -> dict[str, Any] | None:
    """The MoE stage's summary when the run has a finished CLIP-MoE (its summary and its model folder)."""
    from mode_ray.models.moe import MOE_CONFIG_FILE
    from mode_ray.run_root.layout import MOE

    if exists(paths.moe_summary, s3) and exists(join(paths.export(MOE), MOE_CONFIG_FILE), s3):
        return read_json(paths.moe_summary, s3)
    return None


def is_moe(model: Any) -> bool:
    from mode_ray.models.moe import moe_layers

    return next(moe_layers(model), None) is not None


def take_counts(model: Any, tower: str) -> Counts:
    """Routed token slots per expert of one tower's MoE layers since the last take; every counter restarts."""
    from mode_ray.models.moe import moe_layers

    out: Counts = {}
    for t, i, layer in moe_layers(model):
        if t == tower:
            out.setdefault(t, {})[str(i)] = layer.usage.tolist()
        layer.usage.zero_()
    return out


def add(a: Counts, b: Counts) -> Counts:
    out = {tower: {block: list(v) for block, v in blocks.items()} for tower, blocks in a.items()}
    for tower, blocks in b.items():
        for block, values in blocks.items():
            mine = out.setdefault(tower, {}).setdefault(block, [0.0] * len(values))
            out[tower][block] = [x + y for x, y in zip(mine, values, strict=True)]
    return out


def batch_column(counts: Counts, n_rows: int) -> pa.Array:
    """One batch's counts as a string column: the JSON in the first row, nulls after."""
    return pa.array([json.dumps(counts)] + [None] * (n_rows - 1) if n_rows else [], type=pa.string())


def column_counts(table: pa.Table, column: str) -> Counts:
    """The sum of every batch's counts in a featurized table."""
    total: Counts = {}
    for value in table[column].to_pylist():
        if value is not None:
            total = add(total, json.loads(value))
    return total


def shares(counts: Counts) -> Counts:
    """{tower: {block: [share per expert]}}: each block's counts over its routed slots (sums to 1)."""
    return {
        tower: {
            b: [c / sum(v) if sum(v) else 0.0 for c in v] for b, v in sorted(blocks.items(), key=lambda x: int(x[0]))
        }
        for tower, blocks in counts.items()
    }


def usage_record(image: Counts, text: Counts, model: str) -> dict[str, Any]:
    """(image-tower counts, text-tower counts) → what eval/moe_usage.json holds: the shares, the routed
    slots behind them, and what they were counted over."""
    counts = {**image, **text}
    return {
        "model": model,
        "over": {
            "image": "every evaluation image",
            "text": "the class prompts (names × templates) of every task, every context position",
        },
        "shares": shares(counts),
        "routed_slots": {t: {b: int(sum(v)) for b, v in blocks.items()} for t, blocks in counts.items()},
    }


def markdown_lines(record: dict[str, Any]) -> list[str]:
    """A table per tower: blocks × experts, % of routed slots."""
    lines = [
        "",
        f"## Expert usage of `{record['model']}` (% of routed token slots)",
        "",
        f"Images: {record['over']['image']}; texts: {record['over']['text']}. Uniform = "
        f"{100 / max(len(_first(record['shares'])), 1):.0f}% each. Plot: moe_usage.png.",
    ]
    for tower, blocks in record["shares"].items():
        n = len(next(iter(blocks.values())))
        cols = ["block", *[f"e{e}" for e in range(n)], "routed slots"]
        lines += ["", f"{tower} tower:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for block, values in blocks.items():
            slots = record["routed_slots"][tower][block]
            lines.append("| " + " | ".join([block, *[f"{100 * v:.1f}" for v in values], f"{slots:,}"]) + " |")
    return lines


def _first(usage: Counts) -> list[float]:
    return next((v for blocks in usage.values() for v in blocks.values()), [])


def plot(record: dict[str, Any]) -> bytes:
    """One heatmap per tower: MoE blocks × experts, share of routed slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    towers = list(record["shares"])
    fig, axes = plt.subplots(1, len(towers), figsize=(5.5 * len(towers), 4.5), squeeze=False)
    for ax, tower in zip(axes[0], towers, strict=True):
        blocks = record["shares"][tower]
        values = np.array(list(blocks.values()))
        rows = [f"block {b}" for b in blocks]
        columns = [f"expert {e}" for e in range(values.shape[1])]
        share_heatmap(fig, ax, values, rows, columns, f"{record['model']}: {tower} tower, share of routed slots", 8)
    return png_bytes(fig)
