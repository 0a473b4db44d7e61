"""Each training job's data as a Ray Dataset: row groups → the job's rows → decoded CLIP inputs.

    manifest/ ─(once per run, when training.decode_cache)─▶ train_inputs/: decoded pixels + tokens
    row groups (from the Parquet footers) ─▶ draws of the job's rows ─▶ read + filter + shuffle [+ decode]
    ─▶ the Train worker: local shuffle buffer, random resized crops in batch (mode_ray.train.transforms)

A data expert's epoch counts samples, not passes over its partition (docs/training.md): it draws "its partition
plus an `ooc_ratio` share of the others" as often as its steps take, each draw with a fresh out-of-cluster
share. One execution of a job's dataset holds many draws — the whole job on small data, about an epoch on
big data — because every execution start costs seconds; the loop starts another when one runs out. Reads
are by row group, in a shuffled order per draw, and each read task shuffles its rows, so a dense model's
batches mix every partition (one block per partition would feed it one domain at a time). No
`read_parquet`: its file listing asks for a whole CPU per trial, which on a small machine keeps trials from
running side by side; the Parquet footers tell us everything listing would. Rows whose key hash falls in the
hold-out (the same rows for every model and every seed) never train.

With `training.decode_cache` the images are decoded once per run into `train_inputs/` (small models on
small data: decoding was as costly as training); without it, every read task decodes (web-scale data).

Every read of rows goes through `read_rows` (whole row groups, or given rows of a file in a given order), and
every read dataset through `DataTasks.read` (read tasks, or an actor pool). An MCL stage's ranks read their
planned rows by id — a file's offset plus the row in the file (`mode_ray.data.mcl_plan`) — in exactly the
planned order (`read_planned_rows`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from mode_ray.config import Config, S3Config
from mode_ray.run_root.layout import ROW_GROUP_ROWS, RunPaths
from mode_ray.run_root.ownership import fresh_dir
from mode_ray.run_root.storage import (
    exists,
    get_fs,
    join,
    mark_done,
    marker_info,
    settings_hash,
    stage_done,
)
from mode_ray.samples.validate import seeded_key_hash

if TYPE_CHECKING:  # read tasks import this module: no torch or open_clip at import time
    from mode_ray.train.inputs import InputSpec

MANIFEST_COLUMNS = ["key", "image", "caption"]
CACHE_COLUMNS = ["key", "pixels", "text", "ok"]
PER_READ_COLUMN = {False: "texts", True: "texts_tokens"}  # manifest: every text; cache: every text's tokens
ROWS_PER_READ_TASK = 1024
EXECUTION_ROWS = 1_000_000  # up to this many rows, one execution of a job's dataset covers the whole job
DRAW_MARGIN = 1.02  # out-of-cluster draws and the batch cut at the end vary: a little more, not one more pass
HOLDOUT_SALT = 0x5EED  # the hold-out is fixed per run, whatever the training seed
_COARSE_DIR = re.compile(r"coarse_id=(\d+)")
PLAN_FILES = ("file_path", "file_coarse", "file_offset")  # a plan's file table; its rows: file_offset + row in file


class JobLike(Protocol):
    """What the data of a training job depends on (the planner's job type, duck-typed)."""

    name: str
    expert: int | None
    steps: int


@dataclass(frozen=True)
class Source:
    """Where a job reads rows from: the manifest (decoded by each read) or the decoded input cache."""

    root: str
    decoded: bool
    model: str
    s3: dict[str, Any]
    load: int  # decoded side and token count, known up front: a read task then needs no torch or open_clip
    context_length: int
    per_read_captions: bool = False  # a training read draws one of each sample's texts (the reference's way)

    @property
    def columns(self) -> list[str]:
        """What a read takes from the manifest, or from the decoded cache."""
        extra = [PER_READ_COLUMN[self.decoded]] if self.per_read_captions else []
        return self.base_columns + extra

    @property
    def base_columns(self) -> list[str]:
        """What every read of a row needs (the prep-chosen caption, no per-read texts)."""
        return CACHE_COLUMNS if self.decoded else MANIFEST_COLUMNS


def make_source(cfg: Config, root: str, decoded: bool, spec: InputSpec) -> Source:
    per_read = cfg.training.caption_draw == "per_read" and cfg.data.caption_field == "texts"
    s3 = cfg.data.s3.model_dump()
    return Source(root, decoded, cfg.training.model, s3, spec.load, spec.context_length, per_read)


def input_cache_dir(cfg: Config) -> str:
    return join(cfg.run_root, "train_inputs")


def generation_roots(cfg: Config) -> list[str]:
    """The run roots of every generation `mode-ray add-data` completed (a manifest beside the run's)."""
    fs, base = get_fs(join(cfg.run_root, "generations"), cfg.data.s3)
    if not fs.exists(base):
        return []
    prefix = cfg.run_root.split("://", 1)[0] + "://" if "://" in cfg.run_root else ""
    gens = sorted(g.rstrip("/") for g in fs.ls(base, detail=False))
    return [prefix + g for g in gens if fs.exists(f"{g}/manifest/_SUCCESS")]


def training_roots(cfg: Config) -> list[str]:
    """The run's training rows: its manifest (or decoded cache) and those of every complete generation that
    `mode-ray add-data` added (each a manifest written beside the run's, never into it)."""
    sub = "train_inputs" if cfg.training.decode_cache else "manifest"
    roots = [input_cache_dir(cfg) if cfg.training.decode_cache else RunPaths(cfg.run_root).manifest]
    return roots + [join(g, sub) for g in generation_roots(cfg) if exists(join(g, sub, "_SUCCESS"), cfg.data.s3)]


def _footers(root: str, s3: S3Config) -> Iterator[tuple[str, int, Any]]:
    """(path, coarse_id, Parquet metadata) of every file under a coarse_id-partitioned folder, in path order."""
    import pyarrow.parquet as pq

    fs, path = get_fs(root, s3)
    for file in sorted(p for p in fs.find(path) if p.endswith(".parquet")):
        match = _COARSE_DIR.search(file)
        if match is None:
            continue
        with fs.open(file, "rb") as f:
            yield file, int(match.group(1)), pq.ParquetFile(f).metadata


def parquet_files(root: str, s3: S3Config) -> list[dict[str, Any]]:
    """Every non-empty file under a coarse_id-partitioned folder: path, coarse cluster, rows, row groups —
    one entry a file, what an MCL stage reads by (a file's rows are numbered from its `offset`)."""
    files, offset = [], 0
    for path, coarse, meta in _footers(root, s3):
        if meta.num_rows:
            files.append({"path": path, "coarse_id": coarse, "rows": meta.num_rows, "groups": meta.num_row_groups})
            files[-1].update(index=len(files) - 1, offset=offset)
            offset += meta.num_rows
    return files


def row_groups(root: str | list[str], s3: S3Config) -> list[dict[str, Any]]:
    """Every row group under a coarse_id-partitioned folder: path, index, coarse cluster, row count."""
    if isinstance(root, list):
        return [g for r in root for g in row_groups(r, s3)]
    groups = []
    for path, coarse, meta in _footers(root, s3):
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            if rows:
                groups.append({"path": path, "row_group": i, "coarse_id": coarse, "rows": rows})
    return groups


def holdout_fraction(cfg: Config, total_rows: int) -> float:
    """The configured share, lowered on a big manifest so the held-out set stays under holdout_max_rows."""
    t = cfg.training
    if not t.holdout_fraction or not total_rows:
        return 0.0
    return min(t.holdout_fraction, t.holdout_max_rows / total_rows)


def held_out(keys: list[str], fraction: float) -> np.ndarray:
    if not fraction:
        return np.zeros(len(keys), dtype=bool)
    u = np.array([seeded_key_hash(HOLDOUT_SALT, k) for k in keys], dtype=np.float64) / float(2**64)
    return u < fraction


def draws_per_execution(groups: list[dict[str, Any]], job: JobLike, cfg: Config, holdout: float) -> int:
    """How many draws of the job's rows one execution of its dataset holds: the whole job when it is at most
    `EXECUTION_ROWS` rows (each execution start costs seconds), else about one epoch; a short execution is
    simply followed by another."""
    t = cfg.training
    total = sum(g["rows"] for g in groups)
    own = total if job.expert is None else sum(g["rows"] for g in groups if g["coarse_id"] == job.expert)
    per_draw = (own + (t.ooc_ratio * (total - own) if job.expert is not None else 0)) * (1 - holdout)
    job_rows = job.steps * t.batch_size
    target = job_rows if job_rows <= EXECUTION_ROWS else max(t.samples_per_epoch or total, EXECUTION_ROWS)
    return max(1, math.ceil(target * DRAW_MARGIN / max(per_draw, 1.0)))


def draw_items(groups: list[dict[str, Any]], job: JobLike, draws: int, ooc_ratio: float, seed: int) -> list[dict]:
    """The row groups one execution reads: `draws` draws, each in its own shuffled order (the out-of-cluster
    groups are skipped when there is no share to draw). Each item carries the seed its read draws from (the
    out-of-cluster share, the rows' order, per-read captions): the stream is a function of `seed` alone."""
    rng = np.random.default_rng(seed)
    wanted = [g for g in groups if job.expert is None or g["coarse_id"] == job.expert or ooc_ratio > 0]
    items = []
    for _ in range(draws):
        items += [wanted[i] for i in rng.permutation(len(wanted))]
    return [{**item, "seed": seed, "position": i} for i, item in enumerate(items)]


def item_rng(items: dict[str, np.ndarray]) -> np.random.Generator:
    """A read's generator, from the seeds and positions of the items it reads: the same rows whatever task or
    worker reads them, and in whatever order Ray Data runs its tasks."""
    return np.random.default_rng([int(items["seed"][0]), *map(int, items["position"])])


def read_rows(
    source: Source,
    path: str,
    coarse: int,
    groups: Sequence[int] | None = None,
    rows: np.ndarray | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The one reader of training rows (no Ray): rows of one Parquet file of the coarse_id partition `coarse`,
    with a coarse_id column. `groups`: those row groups whole, in that order (None: every one); `rows`
    instead: those rows of the file (numbered over the whole file; any order, repeats allowed), each row
    group they fall in read once. `columns`: default `source.columns`."""
    import pyarrow.parquet as pq

    columns = source.columns if columns is None else columns
    fs, _ = get_fs(source.root, S3Config(**source.s3))
    with fs.open(str(path), "rb") as f:
        file = pq.ParquetFile(f)
        _check_columns(file, columns, str(path))
        if rows is None:
            table = file.read_row_groups(list(range(file.num_row_groups) if groups is None else groups), columns)
        else:
            sizes = np.array([file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)])
            starts = np.concatenate([[0], np.cumsum(sizes)])
            group_of = np.searchsorted(starts, rows, side="right") - 1
            needed = np.unique(group_of)
            at = np.concatenate([[0], np.cumsum(sizes[needed])])  # where each needed group starts in `table`
            table = file.read_row_groups(needed.tolist(), columns)
            table = table.take(pa.array(at[np.searchsorted(needed, group_of)] + rows - starts[group_of]))
    return table.append_column("coarse_id", pa.array(np.full(len(table), int(coarse), dtype=np.int32)))


def _check_columns(file: Any, columns: list[str], path: str) -> None:
    missing = sorted(set(columns) - set(file.schema_arrow.names))
    if missing:  # a manifest or cache made before per-read captions
        raise ValueError(
            f"{path} has no {', '.join(missing)} column: training.caption_draw=per_read needs a manifest from this "
            "version (re-run `mode-ray prep --force`; with training.decode_cache, the cache is rebuilt itself)"
        )


def _read_groups(items: dict[str, np.ndarray], source: Source, keep: Any) -> pa.Table:
    """The items' row groups (path, row_group, coarse_id), each filtered by `keep(table, coarse)`."""
    tables = []
    for path, group, coarse in zip(items["path"], items["row_group"], items["coarse_id"], strict=True):
        table = read_rows(source, str(path), int(coarse), groups=[int(group)])
        tables.append(table.filter(pa.array(keep(table, int(coarse)))))
    return pa.concat_tables(tables)


def _inputs(table: pa.Table, source: Source, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """pixels, text, ok, coarse_id as numpy: unpacked from the cache, or decoded now. With per-read captions
    and an `rng` (a training read), each row's text is drawn from its texts; without one (validation, the
    cache's own caption, MCL clustering) it is the caption prep chose."""
    coarse = table["coarse_id"].to_numpy()
    draw = source.per_read_captions and rng is not None
    if not source.decoded:
        from mode_ray.train.transforms import decode_rows  # torch and open_clip: only where images are decoded

        captions = table["caption"].to_pylist()
        if draw:
            texts = table["texts"].to_pylist()
            captions = [t[rng.integers(len(t))] if t else c for t, c in zip(texts, captions, strict=True)]  # type: ignore[union-attr]
        return {**decode_rows(table["image"].to_pylist(), captions, source.model), "coarse_id": coarse}
    n, side, context = len(table), source.load, source.context_length
    pixels = np.frombuffer(b"".join(table["pixels"].to_pylist()), dtype=np.uint8).reshape(n, side, side, 3)
    text = np.frombuffer(b"".join(table["text"].to_pylist()), dtype=np.int32).reshape(n, context)
    if draw:
        text = text.copy()
        for i, blob in enumerate(table["texts_tokens"].to_pylist()):
            options = np.frombuffer(blob, dtype=np.int32).reshape(-1, context) if blob else None
            if options is not None and len(options):
                text[i] = options[rng.integers(len(options))]  # type: ignore[union-attr]
    return {"pixels": pixels, "text": text, "ok": table["ok"].to_numpy(zero_copy_only=False), "coarse_id": coarse}


def read_job_rows(
    items: dict[str, np.ndarray], source: Source, expert: int, ooc_ratio: float, holdout: float
) -> dict[str, np.ndarray]:
    """Read row groups; keep the job's rows (its partition, each other row with probability `ooc_ratio`, drawn
    afresh for every item of every draw) outside the hold-out; shuffle. `expert` < 0: every row."""
    rng = item_rng(items)

    def keep(table: pa.Table, coarse: int) -> np.ndarray:
        mask = ~held_out(table["key"].to_pylist(), holdout)
        if expert >= 0 and coarse != expert:
            mask &= rng.random(len(table)) < ooc_ratio
        return mask

    table = _read_groups(items, source, keep)
    return _inputs(table.take(pa.array(rng.permutation(len(table)))), source, rng)


def read_holdout_rows(items: dict[str, np.ndarray], source: Source, holdout: float) -> dict[str, np.ndarray]:
    """Only the held-out rows, in manifest order."""
    return _inputs(_read_groups(items, source, lambda table, _: held_out(table["key"].to_pylist(), holdout)), source)


def decode_to_cache(items: dict[str, np.ndarray], source: Source) -> pa.Table:
    """Manifest row groups → cache rows: key, pixels and tokens as bytes, ok, coarse_id."""
    table = _read_groups(items, source, lambda t, _: np.ones(len(t), dtype=bool))
    inputs = _inputs(table, source)
    columns = {
        "key": table["key"],
        "pixels": pa.array([p.tobytes() for p in inputs["pixels"]], type=pa.binary()),
        "text": pa.array([t.tobytes() for t in inputs["text"]], type=pa.binary()),
        "ok": pa.array(inputs["ok"]),
        "coarse_id": pa.array(inputs["coarse_id"]),
    }
    if source.per_read_captions:  # every text tokenized once, so a read draws among tokens
        from mode_ray.train.transforms import tokenize

        texts = [t or [c] for t, c in zip(table["texts"].to_pylist(), table["caption"].to_pylist(), strict=True)]
        tokens = tokenize([x for t in texts for x in t], source.model)
        ends = np.cumsum([len(t) for t in texts])
        blobs = [tokens[end - len(t) : end].tobytes() for t, end in zip(texts, ends, strict=True)]
        columns[PER_READ_COLUMN[True]] = pa.array(blobs, type=pa.binary())
    return pa.table(columns)


def read_calls(items: list[dict[str, Any]]) -> int:
    """How many calls read `items` (each with its `rows`): about ROWS_PER_READ_TASK rows a call, no item split."""
    rows = sum(i["rows"] for i in items)
    return max(1, min(len(items), math.ceil(rows / ROWS_PER_READ_TASK)))


@dataclass(frozen=True)
class DataTasks:
    """A trial's read tasks: few of them, so the same worker processes run one task after another and pay
    for their imports once."""

    cpus: float
    concurrency: int

    def read(
        self, items: list[dict[str, Any]], fn: Any, constructor: dict[str, Any] | None = None, **kwargs: Any
    ) -> Any:
        """The one way a read dataset is made: `fn` over the items (each with its `rows`), about
        ROWS_PER_READ_TASK rows a call. A function runs in up to `concurrency` tasks; a class is an actor pool
        of `concurrency` actors, each built once with `constructor`. The item blocks are tiny: without a batch
        size Ray Data would bundle them all into one task — one block, nothing streamed."""
        import ray

        blocks = read_calls(items)
        size = min(self.concurrency, blocks)  # no more tasks than blocks
        if isinstance(fn, type):
            pool = {"compute": ray.data.ActorPoolStrategy(size=size), "fn_constructor_kwargs": constructor or {}}
        else:
            pool = {"compute": ray.data.TaskPoolStrategy(size=size)}
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            fn,
            fn_kwargs=kwargs,
            batch_size=math.ceil(len(items) / blocks),
            batch_format="numpy",
            num_cpus=self.cpus,
            **pool,
        )


def data_tasks(cfg: Config) -> DataTasks:
    t = cfg.training
    return DataTasks(max(t.run.data_cpus_per_trial / t.run.data_tasks_per_trial, 0.05), t.run.data_tasks_per_trial)


def build_input_cache(cfg: Config, manifest_run_id: str, force: bool = False) -> bool:
    """Decode every manifest image once into train_inputs/ (when training.decode_cache); True if built now."""
    if not cfg.training.decode_cache:
        return False
    out = input_cache_dir(cfg)
    from mode_ray.train.inputs import input_spec

    source = make_source(cfg, RunPaths(cfg.run_root).manifest, False, input_spec(cfg.training.model))
    per_read = ["per_read_captions"] if source.per_read_captions else []  # a cache without them keeps its hash
    settings = settings_hash(manifest_run_id, cfg.training.model, ROW_GROUP_ROWS, *per_read)
    if not force and stage_done(out, settings, cfg.data.s3):
        return False
    fresh_dir(out, "decoded inputs", cfg.data.s3)
    groups = row_groups(source.root, cfg.data.s3)
    from mode_ray.data.data_order import OrderedParquet, keep_order

    keep_order()
    tasks = DataTasks(1.0, max(1, int(_cluster_cpus())))
    ds = tasks.read(groups, decode_to_cache, source=source)
    ds.write_datasink(OrderedParquet(out, cfg.data.s3, "coarse_id", ROW_GROUP_ROWS))
    mark_done(out, settings, cfg.data.s3)
    return True


def build_generation_caches(cfg: Config) -> None:
    """Every generation's decoded cache (a generation that made no expert has none yet), so whatever trains
    next reads all of its rows."""
    for root in generation_roots(cfg):
        manifest_run = marker_info(RunPaths(root).manifest, cfg.data.s3)["run_id"]
        build_input_cache(cfg.model_copy(update={"run_root": root}), manifest_run)


def _cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def job_datasets(cfg: Config, job: JobLike, seed: int, spec: InputSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """({'train_rank0': …, 'holdout': …}, facts) for one job: one training dataset per worker rank (every
    `num_workers`-th item of the draws, read in order: a rank's stream does not depend on which worker is
    faster); the hold-out dataset only when there is one. The input spec comes from the driver, so a trial
    never imports open_clip just to size its rows."""
    t = cfg.training
    roots = training_roots(cfg)
    source = make_source(cfg, roots[0], t.decode_cache, spec)  # the root only names the file system
    groups = row_groups(roots, cfg.data.s3)
    if not groups:
        raise ValueError(f"no training rows under {roots}")
    total = sum(g["rows"] for g in groups)
    holdout = holdout_fraction(cfg, total)
    draws = draws_per_execution(groups, job, cfg, holdout)
    items = draw_items(groups, job, draws, t.ooc_ratio, seed)
    tasks = data_tasks(cfg)
    expert = -1 if job.expert is None else job.expert
    world = t.run.num_workers
    datasets = {
        f"train_rank{r}": tasks.read(
            items[r::world], read_job_rows, source=source, expert=expert, ooc_ratio=t.ooc_ratio, holdout=holdout
        )
        for r in range(world)
    }
    if holdout:
        datasets["holdout"] = tasks.read(groups, read_holdout_rows, source=source, holdout=holdout)
    return datasets, {"manifest_rows": total, "holdout_fraction": holdout, "draws_per_execution": draws}


# --------------------------------------------------------------------------- CLIP-MoE: MCL stages


def own_root(cfg: Config) -> str:
    """The run's own training rows (its decoded cache, or its manifest): what an MCL stage clusters and reads."""
    return input_cache_dir(cfg) if cfg.training.decode_cache else RunPaths(cfg.run_root).manifest


def planned_table(source: Source, plan: dict[str, np.ndarray], ids: np.ndarray) -> pa.Table:
    """The rows a plan names by id (its file's offset + the row in that file), in the order of `ids`: each
    file opened once."""
    offsets = plan["file_offset"]
    file_of = np.searchsorted(offsets, ids, side="right") - 1
    order = np.argsort(file_of, kind="stable")
    files, starts = np.unique(file_of[order], return_index=True)
    tables = []
    for f, lo, hi in zip(files, starts, [*starts[1:], len(ids)], strict=True):
        rows = ids[order[lo:hi]] - offsets[f]
        tables.append(read_rows(source, str(plan["file_path"][f]), int(plan["file_coarse"][f]), rows=rows))
    return pa.concat_tables(tables).take(pa.array(np.argsort(order)))


def read_planned_rows(items: dict[str, np.ndarray], source: Source, plan_url: str, seed: int) -> dict[str, np.ndarray]:
    """An MCL read task: rows [start, stop) of one rank's planned sequence, in exactly that order (per-read
    captions drawn from a generator seeded by the rows' position)."""
    parts = []
    for rank, start, stop in zip(items["rank"], items["start"], items["stop"], strict=True):
        plan = _load_plan(plan_url, tuple(sorted(source.s3.items())), int(rank))
        parts.append(planned_table(source, plan, plan[f"rank{int(rank)}"][int(start) : int(stop)]))
    rng = np.random.default_rng([seed, int(items["rank"][0]), int(items["start"][0])])
    return _inputs(pa.concat_tables(parts), source, rng)


_PLANS: dict[tuple[str, int], tuple[str, dict[str, np.ndarray]]] = {}


def _load_plan(url: str, s3: tuple, rank: int) -> dict[str, np.ndarray]:
    """A stage's file table and one rank's row ids, read once per read-task process (again if the plan file
    changed: a rerun in the same Ray session)."""
    fs, path = get_fs(url, S3Config(**dict(s3)))
    version = fs.ukey(path)
    cached = _PLANS.get((url, rank))
    if cached is None or cached[0] != version:
        with fs.open(path, "rb") as f, np.load(f) as data:  # a zip: only the members asked for are read
            _PLANS[url, rank] = version, {name: data[name] for name in (*PLAN_FILES, f"rank{rank}")}
    return _PLANS[url, rank][1]


def planned_items(rank: int, n: int, chunk: int) -> list[dict[str, int]]:
    return [
        {"rank": rank, "start": s, "stop": min(s + chunk, n), "rows": min(chunk, n - s)} for s in range(0, n, chunk)
    ]


def mcl_datasets(cfg: Config, plan_url: str, ranks: dict[int, int], spec: InputSpec) -> dict[str, Any]:
    """One dataset per worker rank ({rank: planned rows}), each reading its rows in order, plus the hold-out."""
    t = cfg.training
    root = own_root(cfg)
    source = make_source(cfg, root, t.decode_cache, spec)
    per_worker = t.batch_size // t.run.num_workers
    chunk = max(per_worker, ROWS_PER_READ_TASK // per_worker * per_worker)  # whole per-worker batches a task
    tasks = data_tasks(cfg)
    datasets = {
        f"train_rank{rank}": tasks.read(
            planned_items(rank, n, chunk), read_planned_rows, source=source, plan_url=plan_url, seed=t.seed
        )
        for rank, n in ranks.items()
    }
    groups = row_groups(root, cfg.data.s3)
    holdout = holdout_fraction(cfg, sum(g["rows"] for g in groups))
    if holdout:
        datasets["holdout"] = tasks.read(groups, read_holdout_rows, source=source, holdout=holdout)
    return datasets
