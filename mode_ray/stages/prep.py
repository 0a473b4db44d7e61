"""MoDE data preparation (steps 0–3) as Ray Data stages: embed captions, cluster, assign, summarise.

    shards ─read─▶ validate ─▶ embed (actor pool) ─▶ embeddings/   (+ rejects/)
    embeddings/ (sample) ─▶ two-step clustering (one Ray task) ─▶ clusters/centroids.npz
    embeddings/ ─▶ assign (actor pool, faiss) ─▶ manifest/coarse_id=E/

embeddings/ keeps the validated image bytes next to each embedding, so assignment never re-reads the
tars; clustering reads only the columns it needs. Each stage writes a `_SUCCESS` marker holding a hash
of its settings and of the upstream run it consumed: a rerun skips complete stages, a changed setting
or a redone upstream stage redoes everything downstream, and `--force` redoes all.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mode_ray import kmeans
from mode_ray.config import Config, S3Config, without_added_neutral
from mode_ray.console.progress import console, stage_log
from mode_ray.console.progress_bars import progress_bars
from mode_ray.console.progress_bars import report as report_progress
from mode_ray.encoders import build_encoder, encoder_id_for
from mode_ray.ray_env.resources import assignment_needs, clustering_needs, embedding_needs
from mode_ray.ray_env.runtime import require_resources, wait_for_released_cpus
from mode_ray.run_root.layout import ROW_GROUP_ROWS, RunPaths, centroid_geometry, read_centroids
from mode_ray.run_root.ownership import claim_run_root, fresh_dir
from mode_ray.run_root.storage import (
    arrow_filesystem,
    exists,
    get_fs,
    join,
    mark_done,
    marker_info,
    parquet_dataset,
    read_json,
    settings_hash,
    stage_done,
    write_bytes,
    write_json,
)
from mode_ray.samples.hash_sample import HashSample
from mode_ray.samples.rejects import REJECT_COLUMNS, only_rejects, only_valid
from mode_ray.samples.shards import list_shards
from mode_ray.samples.validate import Limits, validate_batch


def _marker_run_id(stage_dir: str, cfg: Config) -> str:
    return marker_info(stage_dir, cfg.data.s3).get("run_id", "")


def embeddings_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list float32 column as an [n, d] array, one row per entry — null entries included (as
    whatever their slots hold: zeros as we write them), which `flatten()` would drop and misalign."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    dim = arr.type.list_size
    start = arr.offset * dim
    return np.asarray(arr.values[start : start + len(arr) * dim], dtype=np.float32).reshape(-1, dim)


def embeddings_to_arrow(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    mask = None if valid is None else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)


# --------------------------------------------------------------------------- Ray Data callables


class CaptionEmbedder:
    """Actor: loads the text encoder once, embeds the captions of valid rows (rejects pass through)."""

    def __init__(
        self, encoder: str, device: str, dtype: str, batch_size: int, num_threads: int | None, board: str | None
    ) -> None:
        self.board = board
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.encoder = build_encoder(encoder, device=device, dtype=dtype, batch_size=batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = batch["reason"].is_null().to_numpy(zero_copy_only=False)
        vectors = np.zeros((len(batch), self.encoder.dim), dtype=np.float32)
        captions = [c for c, ok in zip(batch["caption"].to_pylist(), valid, strict=True) if ok]
        if captions:
            vectors[valid] = self.encoder.encode(captions)
        report_progress(self.board, "samples read, validated and embedded", advance=len(batch))
        return batch.append_column("embedding", embeddings_to_arrow(vectors, valid))


class CentroidAssigner:
    """Actor: builds a faiss inner-product index of the fine centroids once (in the clustering's geometry,
    kmeans.search_space), assigns every row."""

    def __init__(self, fine: np.ndarray, fine_to_coarse: np.ndarray, use_gpu: bool, geometry: str) -> None:
        self.geometry = geometry
        self.index = kmeans.ip_index(kmeans.search_centres(fine, geometry), use_gpu)  # type: ignore[arg-type]
        self.fine_to_coarse = fine_to_coarse

    def __call__(self, batch: pa.Table) -> pa.Table:
        points = kmeans.search_points(embeddings_to_numpy(batch["embedding"]), self.geometry)  # type: ignore[arg-type]
        scores, ids = self.index.search(points, 1)
        fine = ids[:, 0].astype(np.int32)
        columns = ["key", "shard", "caption", "texts", "image", "width", "height"]
        out = batch.select([c for c in columns if c in batch.column_names])  # texts: since per-read captions
        out = out.append_column("fine_id", pa.array(fine))
        out = out.append_column("coarse_id", pa.array(self.fine_to_coarse[fine].astype(np.int32)))
        return out.append_column("score", pa.array(scores[:, 0].astype(np.float32)))


# --------------------------------------------------------------------------- stages


def embed_stage(cfg: Config, paths: RunPaths, force: bool) -> str:
    """Read + validate + embed → embeddings/ and rejects/. Returns the stage's run id."""
    with stage_log("prep: embed") as log:
        shards, missing = list_shards(cfg.data.shards, cfg.data.s3)
        settings = settings_hash(
            cfg.data.model_dump(mode="json"), cfg.embedding.model_dump(mode="json"), shards, missing
        )
        if not force and stage_done(paths.embeddings, settings, cfg.data.s3):
            log.skip("embeddings/ complete")
            return _marker_run_id(paths.embeddings, cfg)
        require_resources(cfg, embedding_needs(cfg), "prep: embed")
        for url, what in ((paths.embeddings, "caption embeddings"), (paths.rejects, "rejects")):
            fresh_dir(url, what, cfg.data.s3)
        if not shards:
            raise ValueError(f"no readable shards in data.shards={cfg.data.shards!r}: {missing}")
        log.info(f"{len(shards)} shards ({len(missing)} missing or unreadable)")
        write_embeddings(cfg, shards, paths)
        write_rejects(cfg, paths, missing)
        run_id = uuid.uuid4().hex
        mark_done(paths.embeddings, settings, cfg.data.s3, run_id=run_id, shards=len(shards))
        log.done("embeddings/ and rejects/ written")
        return run_id


def write_embeddings(cfg: Config, shards: list[str], paths: RunPaths) -> None:
    """Every shard read, validated and its captions embedded by an actor pool → embeddings/ (rejects too)."""
    import ray

    from mode_ray.data.data_order import OrderedParquet, keep_order
    from mode_ray.data.reader import ShardDatasource

    keep_order()  # the same shards give the same embeddings, rejects and manifest, in the same order
    emb, data = cfg.embedding, cfg.data
    limits = Limits(data.caption_field, data.max_image_bytes, data.max_image_pixels, data.seed)
    source = ShardDatasource(shards, filesystem=arrow_filesystem(shards[0], data.s3))
    ds = ray.data.read_datasource(source, override_num_blocks=len(shards))
    ds = ds.map_batches(validate_batch, fn_kwargs={"limits": limits}, batch_format="pyarrow", num_cpus=0.5)
    wait_for_released_cpus()  # also right after Ray starts, before its resources are reported
    with progress_bars("prep-embed") as board:
        ds = ds.map_batches(
            CaptionEmbedder,
            fn_constructor_kwargs={
                "encoder": emb.encoder,
                "device": emb.device,
                "dtype": emb.dtype,
                "batch_size": emb.batch_size,
                "num_threads": emb.num_threads,
                "board": board,
            },
            batch_size=emb.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=emb.min_actors, max_size=emb.max_actors),
            num_cpus=emb.num_cpus_per_actor,
            num_gpus=emb.num_gpus_per_actor or None,
        )
        ds.write_datasink(OrderedParquet(paths.embeddings, data.s3))
    wait_for_released_cpus()


def read_embeddings(paths: RunPaths, s3: S3Config, columns: list[str] | None = None) -> Any:
    """embeddings/ as a Ray Dataset, through Ray Data's first Parquet reader (`use_datasource_v2` off for this
    read). Ray 2.60's default reader lists files on a pool of 32 `FooterReader` actors, each scheduled on a
    whole CPU, for every read: on a small machine that starts processes and holds its CPUs for seconds to
    learn what a few footers of our own writing say (measured on 2 cores: a 500-pair prep 17–19 s → 14–15 s).
    The first reader lists files on the driver and samples a few in tasks, which reuse idle worker processes.
    Its read tasks are as many as the files' bytes on disk fill blocks of Ray Data's target size, which groups
    prep's files as the default reader did (checked at the demo's scale: one task there), so the manifest and
    rejects keep their files and row groups (and training its data order): the same bytes."""
    import ray
    from ray.data import DataContext

    fs, root = get_fs(paths.embeddings, s3)
    size = sum(info["size"] for info in fs.find(root, detail=True).values() if info["name"].endswith(".parquet"))
    context = DataContext.get_current()
    before = context.use_datasource_v2, context.enable_progress_bars
    context.use_datasource_v2 = context.enable_progress_bars = False  # and no bar for its sampling of files
    try:
        ds = ray.data.read_parquet(
            paths.embeddings,
            columns=columns,
            filesystem=arrow_filesystem(paths.embeddings, s3),
            override_num_blocks=max(1, math.ceil(size / context.target_max_block_size)),
        )
    finally:
        context.use_datasource_v2, context.enable_progress_bars = before
    ds.context.enable_progress_bars = before[1]  # the dataset's own copy: its run as every other's
    return ds


def write_rejects(cfg: Config, paths: RunPaths, missing: list[tuple[str, str]]) -> None:
    """rejects/: every sample validation or embedding rejected, with its reason, and the unreadable shards."""
    from mode_ray.data.data_order import OrderedParquet

    rejects = read_embeddings(paths, cfg.data.s3, REJECT_COLUMNS).map_batches(only_rejects, batch_format="pyarrow")
    rejects.write_datasink(OrderedParquet(paths.rejects, cfg.data.s3))
    listing = [
        {"shard": u, "key": None, "stage": "list", "reason": "unreadable_shard", "detail": why} for u, why in missing
    ]
    # Shard-level listing rejects, maybe none: rejects/ always holds a table and reads back.
    schema = pa.schema([(c, pa.string()) for c in REJECT_COLUMNS])
    _write_table(join(paths.rejects, "listing.parquet"), pa.Table.from_pylist(listing, schema=schema), cfg)


def _write_table(url: str, table: pa.Table, cfg: Config) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(url, buf.getvalue(), cfg.data.s3)


def load_cluster_sample(cfg: Config, paths: RunPaths) -> np.ndarray:
    """The k-means sample: the valid samples whose seeded key hash falls under `sample_fraction`, at most
    `max_sample` of them (mode_ray.samples.hash_sample: bounded while it streams in)."""
    ccfg = cfg.clustering
    ds = read_embeddings(paths, cfg.data.s3, ["key", "embedding", "reason"])
    ds = ds.map_batches(only_valid, batch_format="pyarrow")
    sample: HashSample | None = None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=65536):
        vectors = embeddings_to_numpy(batch["embedding"])
        sample = sample or HashSample(ccfg.seed, vectors.shape[1], ccfg.sample_fraction, ccfg.max_sample)
        sample.add(batch["key"].to_pylist(), vectors)
    x = sample.rows() if sample else np.zeros((0, 0))
    if not len(x):
        raise ValueError("no valid samples to cluster: every sample was rejected (see rejects/)")
    return x


def cluster_stage(cfg: Config, paths: RunPaths, upstream: str, force: bool) -> str:
    import ray

    with stage_log("prep: cluster") as log:
        ccfg = cfg.clustering
        settings = settings_hash(without_added_neutral(ccfg.model_dump(mode="json")), upstream)
        if not force and stage_done(paths.clusters, settings, cfg.data.s3):
            log.skip("clusters/centroids.npz complete")
            return _marker_run_id(paths.clusters, cfg)
        require_resources(cfg, clustering_needs(cfg), "prep: cluster")
        fresh_dir(paths.clusters, "clusters", cfg.data.s3)
        sample = load_cluster_sample(cfg, paths)
        log.info(f"fitting {ccfg.n_fine} fine / {ccfg.n_coarse} coarse clusters on {len(sample)} samples")
        fit = ray.remote(num_cpus=1, num_gpus=1 if ccfg.use_gpu else 0)(kmeans.two_step)
        result: kmeans.TwoStepClusters = ray.get(
            fit.remote(
                ray.put(sample),
                ccfg.n_fine,
                ccfg.n_coarse,
                ccfg.iterations,
                ccfg.coarse_iterations,
                ccfg.tol,
                ccfg.seed,
                ccfg.balanced,
                ccfg.use_gpu,
                ccfg.geometry,
            )
        )
        encoder_id = encoder_id_for(cfg.embedding.encoder)
        settings_blob = json.dumps({"clustering": ccfg.model_dump(mode="json"), **result.info}, sort_keys=True)
        buf = io.BytesIO()
        np.savez(
            buf,
            fine=result.fine,
            coarse=result.coarse,
            fine_to_coarse=result.fine_to_coarse,
            fine_sizes=result.fine_sizes,
            fine_raw=result.fine_raw,
            geometry=np.array(result.geometry),
            encoder_id=np.array(encoder_id),
            settings=np.array(settings_blob),
        )
        write_bytes(paths.centroids, buf.getvalue(), cfg.data.s3)
        run_id = uuid.uuid4().hex
        mark_done(paths.clusters, settings, cfg.data.s3, run_id=run_id, **result.info)
        log.done(
            f"{ccfg.n_fine} fine clusters (max/mean size {result.info['fine_size_max_over_mean']:.3f}), "
            f"{ccfg.n_coarse} experts, {result.info['fine_iterations']} iterations"
        )
        return run_id


def assign_stage(cfg: Config, paths: RunPaths, upstream: str, force: bool) -> str:
    import ray

    with stage_log("prep: assign") as log:
        settings = settings_hash(upstream, ROW_GROUP_ROWS)
        if not force and stage_done(paths.manifest, settings, cfg.data.s3):
            log.skip("manifest/ complete")
            return _marker_run_id(paths.manifest, cfg)
        require_resources(cfg, assignment_needs(cfg), "prep: assign")
        fresh_dir(paths.manifest, "the manifest", cfg.data.s3)
        from mode_ray.data.data_order import OrderedParquet, keep_order

        keep_order()
        cents = read_centroids(paths.centroids, cfg.data.s3)
        emb = cfg.embedding
        ds = read_embeddings(paths, cfg.data.s3).map_batches(only_valid, batch_format="pyarrow")
        ds = ds.map_batches(
            CentroidAssigner,
            fn_constructor_kwargs={
                "fine": cents["fine"],
                "fine_to_coarse": cents["fine_to_coarse"],
                "use_gpu": cfg.clustering.use_gpu,
                "geometry": centroid_geometry(cents),
            },
            batch_size=4096,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=emb.min_actors, max_size=emb.max_actors),
            num_cpus=emb.num_cpus_per_actor,
        )
        wait_for_released_cpus()
        ds.write_datasink(OrderedParquet(paths.manifest, cfg.data.s3, "coarse_id", ROW_GROUP_ROWS))
        run_id = uuid.uuid4().hex
        mark_done(paths.manifest, settings, cfg.data.s3, run_id=run_id)
        log.done("manifest/ written, partitioned by coarse_id")
        return run_id


def _value_counts(url: str, columns: list[str], label: Any, s3: S3Config) -> dict[str, int]:
    """Counts per label (`label(batch) -> array`) over a Parquet folder, streamed batch by batch here: only
    `columns` are read, by pyarrow's scanner (files in parallel threads). Not Ray Data: for counts, starting
    its tasks cost more than the read (3-9 s against 0.02 s for the demo's 8,000-row manifest)."""
    data = parquet_dataset(url, s3)
    if not set(columns) <= set(data.schema.names):  # a folder with no files: nothing to count
        return {}
    totals: dict[str, int] = {}
    for batch in data.to_batches(columns=columns):
        counts = pc.value_counts(label(batch))
        for value, count in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            totals[str(value)] = totals.get(str(value), 0) + int(count)
    return totals


def _reject_label(batch: pa.Table) -> pa.Array:
    """'reason' for a sample reject, 'reason/shard' for a shard-level one (no sample key)."""
    suffix = pc.if_else(pc.is_null(batch["key"]), "/shard", "")
    return pc.binary_join_element_wise(batch["reason"], suffix, "")


def summarise(cfg: Config, paths: RunPaths) -> dict[str, Any]:
    """Samples in, rejects by reason, cluster size histogram, per-expert counts → prep/summary.json."""
    labels = _value_counts(paths.rejects, ["key", "reason"], _reject_label, cfg.data.s3)
    by_reason: dict[str, int] = {}
    for label, count in labels.items():
        reason = label.removesuffix("/shard")
        by_reason[reason] = by_reason.get(reason, 0) + count
    shard_level = sum(c for label, c in labels.items() if label.endswith("/shard"))
    sample_rejects = sum(labels.values()) - shard_level
    cents = read_centroids(paths.centroids, cfg.data.s3)
    n_fine, f2c = len(cents["fine"]), cents["fine_to_coarse"]
    fine_counts = np.zeros(n_fine, dtype=np.int64)
    for fine_id, count in _value_counts(paths.manifest, ["fine_id"], lambda b: b["fine_id"], cfg.data.s3).items():
        fine_counts[int(fine_id)] = count
    per_expert = np.bincount(f2c, weights=fine_counts, minlength=len(cents["coarse"])).astype(np.int64)
    used = fine_counts[fine_counts > 0]
    hist, edges = np.histogram(used, bins=min(10, max(1, len(used))))
    summary = {
        "samples_in": int(fine_counts.sum()) + sample_rejects,
        "in_manifest": int(fine_counts.sum()),
        "rejected_samples": sample_rejects,
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "shard_level_rejects": shard_level,
        "per_expert": {str(e): int(c) for e, c in enumerate(per_expert)},
        "fine_clusters": n_fine,
        "fine_clusters_used": int(len(used)),
        "fine_sizes": fine_counts.tolist(),
        "fine_size_histogram": {"counts": hist.tolist(), "edges": [float(e) for e in edges]},
        "fine_sizes_on_sample": cents["fine_sizes"].tolist(),
        "encoder_id": str(cents["encoder_id"]),
        "clustering": json.loads(str(cents["settings"])),
    }
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    reasons = ", ".join(f"{k}={v}" for k, v in summary["rejects_by_reason"].items())
    console.print(
        f"samples in: {summary['samples_in']}  manifest: {summary['in_manifest']}  "
        f"rejected: {summary['rejected_samples']}  shard-level rejects: {summary['shard_level_rejects']}"
        + (f"  ({reasons})" if reasons else "")
    )
    per_expert = ", ".join(f"expert-{e} {n:,}" for e, n in summary["per_expert"].items())
    console.print(f"samples per data expert (coarse cluster): {per_expert}")
    hist = summary["fine_size_histogram"]
    console.print(f"fine cluster sizes (histogram): {hist['counts']} over edges {[round(e) for e in hist['edges']]}")


def run_prep(cfg: Config, force: bool = False) -> dict[str, Any]:
    """MoDE steps 0–3 end to end; complete stages are skipped."""
    from mode_ray.ray_env.runtime import ray_runtime

    paths = RunPaths(cfg.run_root)
    claim_run_root(cfg.run_root, cfg.data.s3)
    with ray_runtime(cfg):
        embedded = embed_stage(cfg, paths, force)
        clustered = cluster_stage(cfg, paths, embedded, force)
        assigned = assign_stage(cfg, paths, clustered, force)
        with stage_log("prep: summary") as log:
            summary = read_json(paths.prep_summary, cfg.data.s3) if exists(paths.prep_summary, cfg.data.s3) else {}
            if force or summary.get("manifest_run_id") != assigned:
                summary = {**summarise(cfg, paths), "manifest_run_id": assigned}
                write_json(paths.prep_summary, summary, cfg.data.s3)
            print_summary(summary)
            log.done(f"at {paths.prep_summary}")
    return summary
