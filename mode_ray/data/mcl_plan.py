"""CLIP-MoE's MCL stage data (docs/moe.md): every training pair labelled by k-means of the previous stage's image
and text embeddings, labels accumulated over stages, and each rank's cluster-homogeneous batch plan — with
nothing sized by the data on the driver:

    the run's rows (Parquet files, listed from their footers: one entry a file)
    ─▶ the stage's embedding actor: a seeded hash sample of the pairs (outside the hold-out) embedded by the
       previous stage's model
    ─▶ driver: at most moe.cluster_sample_rows of them (the smallest hashes) ─▶ k-means per modality ─▶ the centres
    ─▶ the same actor: every pair embedded, its nearest centre per modality, accumulated with the previous stage's
       label of the same row (read by the actor from that stage's file of the same rows)
       ─▶ labels/part-FFFFFF.parquet: one file per input file, all its rows in order (−1: held out or unreadable)
    ─▶ driver: the `acc` column only (8 bytes a row) ─▶ the batch plan ─▶ plan.npz (the file table, each rank's
       row ids) and plan.json (facts)

A row's id is its file's offset plus its row in the file, so position in the labels files is the id, and the
training reads (`train_data.read_planned_rows`) find each planned row by it. With all pairs inside the sample,
the centres and labels are those k-means on every pair gives for the same seed (`kmeans.mcl_stage_labels`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from mode_ray.config import Config, S3Config
from mode_ray.data.train_data import (
    PLAN_FILES,
    ROWS_PER_READ_TASK,
    Source,
    _inputs,
    held_out,
    holdout_fraction,
    make_source,
    own_root,
    parquet_files,
    read_calls,
    read_rows,
)
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.ownership import claim, fresh_dir
from mode_ray.run_root.storage import get_fs, join, read_bytes, write_bytes, write_json
from mode_ray.samples.hash_sample import hash_positions
from mode_ray.train.inputs import input_spec

SAMPLE_MARGIN = 1.1  # the hash sample aims this much above the bound, which the driver then trims to
EMBED_CPUS = 1.0  # the stage's one embedding actor
LABEL_COLUMNS = ("key", "path", "row", "row_id", "label", "acc")


def stage_name(stage: int) -> str:
    return f"stage-{stage}"


def labels_dir(cfg: Config, stage: int) -> str:
    return join(RunPaths(cfg.run_root).moe(stage_name(stage)), "labels")


def labels_file(folder: str, index: int) -> str:
    return join(folder, f"part-{index:06d}.parquet")


@dataclass(frozen=True)
class StageRows:
    """The rows an MCL stage labels: the run's own manifest or decoded cache, one entry a file."""

    source: Source
    files: list[dict[str, Any]]  # path, coarse_id, rows, groups, index, offset
    holdout: float

    @property
    def total(self) -> int:
        return sum(f["rows"] for f in self.files)


def stage_rows(cfg: Config) -> StageRows:
    root = own_root(cfg)
    files = parquet_files(root, cfg.data.s3)
    if not files:
        raise ValueError(f"no training rows under {root}")
    source = make_source(cfg, root, cfg.training.decode_cache, input_spec(cfg.training.model))
    return StageRows(source, files, holdout_fraction(cfg, sum(f["rows"] for f in files)))


# --------------------------------------------------------------------------- the actors


class PairEmbedder:
    """A dense CLIP loaded once (the base of the stage's actor); CLIP inputs in → unit image and text embeddings out."""

    def __init__(self, model_url: str, source: Source, holdout: float, s3: dict[str, Any]) -> None:
        import torch

        from mode_ray.models import load_model
        from mode_ray.models.lean_import import import_open_clip_for_exports

        torch.set_num_threads(1)
        store = S3Config(**s3)
        import_open_clip_for_exports([model_url], store)  # an actor for this model alone
        self.model = load_model(model_url, store)[0]
        self.source, self.holdout = source, holdout
        with torch.no_grad():
            self.dim = int(self.model.encode_text(torch.zeros((1, source.context_length), dtype=torch.long)).shape[1])

    def embed(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ok, image, text): which rows decoded, and the embeddings of those rows."""
        import torch
        import torch.nn.functional as F

        from mode_ray.train.transforms import augment

        inputs = _inputs(table, self.source)
        ok = np.asarray(inputs["ok"], dtype=bool)
        pixels, tokens = np.asarray(inputs["pixels"])[ok], np.asarray(inputs["text"])[ok]
        images = [np.zeros((0, self.dim), dtype=np.float32)]
        texts = [np.zeros((0, self.dim), dtype=np.float32)]
        with torch.no_grad():
            for i in range(0, len(pixels), 256):
                batch = augment(torch.from_numpy(pixels[i : i + 256]), self.source.model, train=False)
                images.append(F.normalize(self.model.encode_image(batch)).numpy())
                texts.append(F.normalize(self.model.encode_text(torch.from_numpy(tokens[i : i + 256]).long())).numpy())
        return ok, np.concatenate(images).astype(np.float32), np.concatenate(texts).astype(np.float32)


NONE, SKIPPED = -1, -2  # the label of a held-out row, of a pair whose image did not decode (acc: −1 for both)


class StageEmbedder(PairEmbedder):
    """A Ray actor, one per stage, for both passes over the rows: the hash sample the centres are fit on, then
    every pair labelled. Not two Ray Data executions: each would start its own actor — a process, its imports
    (torch, open_clip) and the model — for the same model, on the MoE chain's critical path."""

    def sample(self, files: list[dict[str, Any]], seed: int, fraction: float) -> dict[str, np.ndarray]:
        """Each file's rows whose seeded hash falls under `fraction` (outside the hold-out), embedded: row id,
        hash, image and text embeddings."""
        out: dict[str, list[np.ndarray]] = {"row_id": [np.zeros(0, dtype=np.int64)], "u": [np.zeros(0)]}
        out |= {"image": [np.zeros((0, self.dim), np.float32)], "text": [np.zeros((0, self.dim), np.float32)]}
        for f in files:
            keys = read_rows(self.source, str(f["path"]), int(f["coarse_id"]), columns=["key"])["key"].to_pylist()
            u = hash_positions(keys, seed)
            rows = np.flatnonzero((u < fraction) & ~held_out(keys, self.holdout))
            for start in range(0, len(rows), ROWS_PER_READ_TASK):
                chunk = rows[start : start + ROWS_PER_READ_TASK]
                columns = self.source.base_columns
                table = read_rows(self.source, str(f["path"]), int(f["coarse_id"]), rows=chunk, columns=columns)
                ok, image, text = self.embed(table)
                out["row_id"].append(int(f["offset"]) + chunk[ok])
                out["u"].append(u[chunk[ok]])
                out["image"].append(image)
                out["text"].append(text)
        return {name: np.concatenate(parts) for name, parts in out.items()}

    def label(self, files: list[dict[str, Any]], centres: tuple, out: str, previous: str | None) -> dict[str, int]:
        """Every row of each file labelled by its nearest centres and accumulated with the previous stage's label
        of the same row, written to the stage's labels file of that input file; only counts come back."""
        self.centres, self.previous = centres, previous
        counts = {"files": 0, "rows": 0, "skipped_images": 0}
        for f in files:
            table = self.label_file(f["index"], f["path"], f["coarse_id"], f["offset"], f["groups"], f["rows"])
            write_bytes(labels_file(out, int(f["index"])), _parquet(table), S3Config(**self.source.s3))
            counts["files"] += 1
            counts["rows"] += int((table["acc"].to_numpy() >= 0).sum())
            counts["skipped_images"] += int((table["label"].to_numpy() == SKIPPED).sum())
        return counts

    def label_file(self, index: int, path: Any, coarse_id: Any, offset: Any, groups: Any, rows: Any) -> pa.Table:
        """One file's rows, a few row groups at a time: key, where it lives, this stage's label, acc."""
        path, groups = str(path), int(groups)
        previous = self.previous_labels(index, int(rows))
        step = max(1, groups * ROWS_PER_READ_TASK // max(int(rows), 1))  # ~ROWS_PER_READ_TASK rows a read
        keys: list[str] = []
        labels, accs = [], []
        for g in range(0, groups, step):
            wanted = range(g, min(g + step, groups))
            table = read_rows(self.source, path, int(coarse_id), groups=wanted, columns=self.source.base_columns)
            prev = None if previous is None else _aligned(previous, table["key"].to_pylist(), len(keys), path)
            label, acc = self.label_rows(table, prev)
            keys += table["key"].to_pylist()
            labels.append(label)
            accs.append(acc)
        n = len(keys)
        return pa.table(
            {
                "key": pa.array(keys, type=pa.string()),
                "path": pa.array([path] * n, type=pa.string()).dictionary_encode(),
                "row": np.arange(n, dtype=np.int64),
                "row_id": int(offset) + np.arange(n, dtype=np.int64),
                "label": np.concatenate(labels),
                "acc": np.concatenate(accs),
            }
        )

    def label_rows(self, table: pa.Table, previous: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(label, acc) of the rows: NONE for a held-out row, SKIPPED for an image that did not decode."""
        from mode_ray.kmeans import mcl_assign

        label, acc = np.full(len(table), NONE, dtype=np.int64), np.full(len(table), NONE, dtype=np.int64)
        usable = np.flatnonzero(~held_out(table["key"].to_pylist(), self.holdout))
        if not len(usable):
            return label, acc
        ok, image, text = self.embed(table.take(pa.array(usable)))
        label[usable[~ok]] = SKIPPED
        if ok.any():
            rows = usable[ok]
            label[rows], acc[rows] = mcl_assign(
                image, text, *self.centres, None if previous is None else previous[rows]
            )
        return label, acc

    def previous_labels(self, index: int, rows: int) -> pa.Table | None:
        """The previous stage's labels of this file's rows (stage 1: none)."""
        import pyarrow.parquet as pq

        if self.previous is None:
            return None
        url = labels_file(self.previous, index)
        try:
            table = pq.read_table(io.BytesIO(read_bytes(url, S3Config(**self.source.s3))), columns=["key", "acc"])
        except FileNotFoundError:
            table = None
        if table is None or len(table) != rows:
            raise RuntimeError(
                f"{url} does not label this stage's rows: the previous MCL stage ran on other data; rerun with --force"
            )
        return table


def _aligned(previous: pa.Table, keys: list[str], start: int, path: str) -> np.ndarray:
    """The previous stage's accumulated labels of rows [start, start + len(keys)) of a file, checked by key."""
    if previous["key"].slice(start, len(keys)).to_pylist() != keys:
        raise RuntimeError(f"the previous MCL stage's labels of {path} were made on other rows: rerun with --force")
    return previous["acc"].slice(start, len(keys)).to_numpy()


def _parquet(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------- the driver


def stage_embedder(cfg: Config, rows: StageRows, model_url: str) -> Any:
    """The stage's embedding actor (`StageEmbedder`): restarted if its process dies, and its calls retried —
    a labels file is written whole, so a retried one is the same file."""
    import ray

    actor = ray.remote(num_cpus=EMBED_CPUS, max_restarts=2, max_task_retries=2)(StageEmbedder)
    return actor.remote(model_url, rows.source, rows.holdout, cfg.data.s3.model_dump())


def file_batches(files: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The files in consecutive calls of about ROWS_PER_READ_TASK rows each (a file is never split)."""
    size = math.ceil(len(files) / read_calls(files))  # as the Ray Data reads split them
    return [files[i : i + size] for i in range(0, len(files), size)]


def cluster_sample(cfg: Config, rows: StageRows, embedder: Any, seed: int) -> dict[str, np.ndarray]:
    """The pairs the stage's k-means fit on, in row order: a seeded hash sample, at most moe.cluster_sample_rows (the
    smallest hashes). The driver never holds more than twice that, plus one call's share."""
    import ray

    cap = cfg.moe.cluster_sample_rows
    fraction = min(1.0, SAMPLE_MARGIN * cap / max(rows.total * (1 - rows.holdout), 1.0))
    calls = [embedder.sample.remote(files, seed, fraction) for files in file_batches(rows.files)]
    kept: dict[str, np.ndarray] | None = None
    for call in calls:  # the actor runs them in order; each result is taken as it comes
        batch = ray.get(call)
        kept = batch if kept is None else {name: np.concatenate([kept[name], batch[name]]) for name in batch}
        if len(kept["row_id"]) > 2 * cap:
            kept = _smallest(kept, cap)
    if kept is None or not len(kept["row_id"]):
        raise ValueError(f"no pairs to cluster under {rows.source.root}: every image was unreadable or held out")
    kept = _smallest(kept, cap)
    order = np.argsort(kept["row_id"])
    return {name: values[order] for name, values in kept.items()}


def _smallest(rows: dict[str, np.ndarray], cap: int) -> dict[str, np.ndarray]:
    keep = np.lexsort((rows["row_id"], rows["u"]))[:cap]
    return {name: values[keep] for name, values in rows.items()}


def label_pairs(cfg: Config, rows: StageRows, embedder: Any, centres: tuple, stage: int) -> dict[str, int]:
    """Every pair labelled by the actor into labels/; returns the counts (labelled rows, unreadable images)."""
    import ray

    out = labels_dir(cfg, stage)
    fresh_dir(out, f"MCL {stage_name(stage)} labels", cfg.data.s3)
    previous = labels_dir(cfg, stage - 1) if stage > 1 else None
    centres_ref = ray.put(centres)  # once, not with every call
    calls = [embedder.label.remote(files, centres_ref, out, previous) for files in file_batches(rows.files)]
    totals = {"files": 0, "rows": 0, "skipped_images": 0}
    for counts in ray.get(calls):
        totals = {name: totals[name] + counts[name] for name in totals}
    if totals["files"] != len(rows.files):
        raise RuntimeError(f"labels came back for {totals['files']} of {len(rows.files)} files")
    return totals


def read_acc(cfg: Config, stage: int, rows: StageRows) -> np.ndarray:
    """The stage's accumulated labels of every row, in row-id order: the one column the planner reads."""
    import pyarrow.parquet as pq

    folder = labels_dir(cfg, stage)
    parts = []
    for f in rows.files:
        fs, path = get_fs(labels_file(folder, f["index"]), cfg.data.s3)
        with fs.open(path, "rb") as handle:
            parts.append(pq.read_table(handle, columns=["acc"])["acc"].to_numpy())
    acc = np.concatenate(parts)
    if len(acc) != rows.total:
        raise RuntimeError(f"{folder} labels {len(acc)} rows, the stage's files hold {rows.total}")
    return acc


def write_plan(url: str, rows: StageRows, ranks: dict[int, np.ndarray], cfg: Config) -> None:
    """The plan: the file table (path, coarse id, first row id) and each rank's row ids, in order."""
    offsets = [f["offset"] for f in rows.files] + [rows.total]
    columns = (
        np.array([f["path"] for f in rows.files]),
        np.array([f["coarse_id"] for f in rows.files], dtype=np.int32),
        np.array(offsets, dtype=np.int64),
    )
    table = dict(zip(PLAN_FILES, columns, strict=True))
    buf = io.BytesIO()
    np.savez(buf, **table, **{f"rank{r}": ids for r, ids in ranks.items()})
    write_bytes(url, buf.getvalue(), cfg.data.s3)


def prepare_stage(cfg: Config, stage: int, model_url: str, seed: int) -> dict[str, Any]:
    """Cluster a bounded sample embedded by the previous stage's model, label every pair where it is read, plan
    the batches; returns the stage's facts (also in plan.json)."""
    import ray

    from mode_ray import kmeans
    from mode_ray.train.sampler import epoch_steps, homogeneous_batches

    moe, t = cfg.moe, cfg.training
    out = RunPaths(cfg.run_root).moe(stage_name(stage))
    claim(out, f"MCL {stage_name(stage)}", cfg.data.s3)  # before its plan: the stage's job trains into it
    rows = stage_rows(cfg)
    embedder = stage_embedder(cfg, rows, model_url)
    try:
        sample = cluster_sample(cfg, rows, embedder, seed)
        centres = kmeans.mcl_fit(sample["image"], sample["text"], moe.image_clusters, moe.text_clusters, seed)
        del sample
        counts = label_pairs(cfg, rows, embedder, centres, stage)
    finally:
        ray.kill(embedder)
    acc = read_acc(cfg, stage, rows)
    ids = np.flatnonzero(acc >= 0)
    acc = acc[ids]
    steps = epoch_steps(acc, t.batch_size, moe.stage_epochs, moe.mcl_last_batch)
    plan = homogeneous_batches(
        acc, t.batch_size, steps, t.run.num_workers, seed, moe.mcl_last_batch, moe.mcl_batch_order
    )
    write_plan(
        join(out, "plan.npz"),
        rows,
        {r: ids[plan.rank_rows(r, t.run.num_workers)] for r in range(t.run.num_workers)},
        cfg,
    )
    values, sizes = np.unique(acc, return_counts=True)
    facts = {
        "stage": stage,
        "rows": len(acc),
        "clusters": {str(v): int(c) for v, c in zip(values, sizes, strict=True)},
        "small_clusters": {str(k): v for k, v in plan.small_clusters.items()},
        "rows_in_small_clusters": plan.skipped_rows,
        "rows_repeated_to_fill_batches": plan.filled,
        "rows_dropped_by_truncation": plan.dropped,
        "skipped_images": counts["skipped_images"],
        "steps": steps,
    }
    write_json(join(out, "plan.json"), facts, cfg.data.s3)
    return facts
