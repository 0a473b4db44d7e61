"""`mode-ray eval`: every trained model, the routed ensembles and the controls on zero-shot tasks and
retrieval → eval/report.{csv,md,png} (+ predictions, logits and routing weights to recompute them).

    task images ─read (Ray Data)─▶ decode/check ─▶ image features of every model (actor) ─▶ driver
    class names × templates, captions ─▶ text features of every model (one Ray task)     ─▶ driver
    driver: routing (clustering encoder + fine centres) → cosine logits → ensembles → report
            (plain Python: mode_ray/eval/assemble.py)

Each image is read and decoded once, and all models see it in the same actor, so adding models costs
forward passes only. Images that cannot be used are counted per task and reason, never dropped silently.
A run's CLIP-MoE (`moe`, when moe/ has a finished model) is evaluated as one more single model, with its
expert usage on the images and class prompts counted on the way (mode_ray/eval/moe_usage.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from mode_ray.config import Config, EvalTaskConfig, S3Config
from mode_ray.console.progress import StageLog, console, stage_log
from mode_ray.console.progress_bars import progress_bars
from mode_ray.console.progress_bars import report as report_progress
from mode_ray.eval import moe_usage
from mode_ray.eval.assemble import (
    EvalPlan,
    Features,
    Featurized,
    print_accuracy,
    source_key,
    task_inputs,
    write_results,
)
from mode_ray.eval.rows import folder_rows, webdataset_rows
from mode_ray.eval.scoring import RETRIEVAL_TASK
from mode_ray.eval.suite import RETRIEVAL, Suite, resolve_benchmark
from mode_ray.routing.router import TaskRouter
from mode_ray.run_root.layout import MOE, RunPaths
from mode_ray.run_root.names import GENERALIST, MATCHED, SEED, expert_ids
from mode_ray.run_root.ownership import claim_run_root
from mode_ray.run_root.registry import in_service
from mode_ray.run_root.storage import (
    arrow_filesystem,
    exists,
    get_fs,
    join,
    mark_done,
    marker_info,
    read_json,
    settings_hash,
    stage_done,
)
from mode_ray.samples.shards import list_shards
from mode_ray.samples.validate import IMAGE_SUFFIXES, Limits
from mode_ray.stages.prep import embeddings_to_arrow, embeddings_to_numpy

# --------------------------------------------------------------------------- Ray pieces


class ImageFeaturizer:
    """Actor: every model once; each batch decoded once per distinct preprocessing, then every model's
    normalised image features as fixed-size-list columns `f:{model}`, and for a MoE the batch's expert
    counts as `u:{model}` (see mode_ray/eval/moe_usage.py)."""

    def __init__(self, exports: dict[str, str], s3: dict[str, Any] | None, device: str, board: str | None) -> None:
        from mode_ray.models import load_model
        from mode_ray.models.lean_import import import_open_clip_for_exports
        from mode_ray.models.moe import track_usage

        self.device, self.board = device, board
        store = S3Config(**(s3 or {}))
        import_open_clip_for_exports(exports.values(), store)  # an actor for these models alone
        self.models = {name: load_model(url, store, device)[:2] for name, url in exports.items()}
        self.moes = [name for name, (model, _) in self.models.items() if moe_usage.is_moe(model)]
        for name in self.moes:
            track_usage(self.models[name][0], True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from mode_ray.eval.zero_shot import image_features, preprocess

        ok = batch["reason"].is_null().to_numpy(zero_copy_only=False)
        images = batch["image"].filter(pa.array(ok)).to_pylist()
        pixels = {}
        out = batch.drop_columns(["image"])
        for name, (model, transform) in self.models.items():
            key = repr(transform)
            if key not in pixels and images:
                pixels[key] = preprocess(images, transform)
            dim = int(model.text_projection.shape[-1])
            feats = np.zeros((len(batch), dim), dtype=np.float32)
            if ok.any():
                feats[ok] = image_features(model, pixels[key], self.device)
            out = out.append_column(f"f:{name}", embeddings_to_arrow(feats, ok))
        for name in self.moes:
            counts = moe_usage.take_counts(self.models[name][0], "image")
            out = out.append_column(f"u:{name}", moe_usage.batch_column(counts, len(batch)))
        report_progress(self.board, f"images through {len(self.models)} models", advance=len(batch))
        return out


def featurize(cfg: Config, source: str, location: str | list[str], exports: dict[str, str]) -> pa.Table:
    """Read one image source and return its rows with every model's image features, sorted by key. The read
    order is kept, so every run embeds the same rows in the same batches (a batch's shape can change a row's
    features in their last bits): the report is the same bytes run to run."""
    import ray

    from mode_ray.data.data_order import keep_order

    keep_order()
    limits = Limits(cfg.data.caption_field, cfg.data.max_image_bytes, cfg.data.max_image_pixels, cfg.data.seed)
    s3 = cfg.data.s3
    if source == "webdataset":
        from mode_ray.data.reader import ShardDatasource

        shards, missing = list_shards(location, s3)
        if missing:
            console.print(f"[yellow]eval: {len(missing)} unreadable shard(s) in {location}: {missing[:3]}[/yellow]")
        if not shards:
            raise ValueError(f"no readable eval shards in {location!r}")
        ds = ray.data.read_datasource(
            ShardDatasource(shards, filesystem=arrow_filesystem(shards[0], s3)), override_num_blocks=len(shards)
        )
        ds = ds.map_batches(webdataset_rows, fn_kwargs={"limits": limits}, batch_format="pyarrow", num_cpus=0.5)
    else:
        assert isinstance(location, str), "a folder task has one location"
        fs, root = get_fs(location, s3)
        files = sorted(p for p in fs.find(root) if p.rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {location!r}")
        prefix = location.split("://", 1)[0] + "://" if "://" in location else ""
        ds = ray.data.read_binary_files(
            [prefix + p for p in files], include_paths=True, filesystem=arrow_filesystem(location, s3)
        )
        ds = ds.map_batches(
            folder_rows, fn_kwargs={"limits": limits, "root": location}, batch_format="pyarrow", num_cpus=0.5
        )
    with progress_bars("eval-images") as board:
        ds = ds.map_batches(
            ImageFeaturizer,
            fn_constructor_kwargs={
                "exports": exports,
                "s3": s3.model_dump(),
                "device": "cuda" if cfg.eval.use_gpu else "cpu",
                "board": board,
            },
            batch_size=cfg.eval.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=cfg.eval.num_cpus,
            num_gpus=1 if cfg.eval.use_gpu else None,
        )
        table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    return table.sort_by("key")


def text_features(
    cfg: Config,
    exports: dict[str, str],
    prompts: dict[str, tuple[list[str], list[str]]],
    corpora: dict[str, list[str]],
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]], dict[str, moe_usage.Counts]]:
    """Per model: class-text features per task, and features of each retrieval task's texts — in one Ray
    task; and per MoE, its text tower's expert counts over the class prompts."""
    import ray

    def encode(exports, s3, prompts, corpora, device):
        from mode_ray.eval.zero_shot import class_text_features
        from mode_ray.eval.zero_shot import text_features as encode_texts
        from mode_ray.models import load_model
        from mode_ray.models.moe import track_usage

        per_task, per_caption, usage = {}, {}, {}
        for name, url in exports.items():
            model, _, tokenizer = load_model(url, S3Config(**s3), device)
            track_usage(model, True)  # a no-op for a dense model
            per_task[name] = {
                task: class_text_features(model, tokenizer, names, templates, device)
                for task, (names, templates) in prompts.items()
            }
            if moe_usage.is_moe(model):
                usage[name] = moe_usage.take_counts(model, "text")
            track_usage(model, False)
            per_caption[name] = {task: encode_texts(model, tokenizer, texts, device) for task, texts in corpora.items()}
        return per_task, per_caption, usage

    remote = ray.remote(num_cpus=cfg.eval.num_cpus, num_gpus=1 if cfg.eval.use_gpu else 0)(encode)
    device = "cuda" if cfg.eval.use_gpu else "cpu"
    return ray.get(remote.remote(exports, cfg.data.s3.model_dump(), prompts, corpora, device))


# --------------------------------------------------------------------------- driver


def eval_shards_corpus(cfg: Config) -> EvalTaskConfig | None:
    """eval.shards' captions as the `retrieval` task: identical captions one text (web captions repeat)."""
    if not (cfg.eval.retrieval and cfg.eval.shards):
        return None
    return EvalTaskConfig(
        name=RETRIEVAL_TASK,
        source="webdataset",
        location=cfg.eval.shards,
        kind=RETRIEVAL,
        merge_identical_captions=True,
    )


def check_eval_inputs(cfg: Config, suite: Suite | None = None) -> list[EvalTaskConfig]:
    """The configured tasks; an error when there is nothing to evaluate (checked before `mode-ray run` starts,
    not after hours of training)."""
    from mode_ray.eval.tasks import configured_tasks

    tasks = configured_tasks(cfg, suite)
    corpus = eval_shards_corpus(cfg)
    if corpus is not None and any(t.name == corpus.name for t in tasks):
        raise ValueError(f"eval task name {corpus.name!r} is eval.shards' retrieval task: name yours otherwise")
    if not tasks and corpus is None:
        raise ValueError(
            "nothing to evaluate: set eval.shards (held-out image-caption shards: retrieval) or eval.tasks "
            "(zero-shot classification), or leave the eval stage out (--only)"
        )
    return tasks


def plan_eval(cfg: Config) -> EvalPlan:
    """The models, tasks, suite and MoE of this evaluation, and its settings hash; an error when there is
    nothing to evaluate or no data expert to ensemble."""
    paths = RunPaths(cfg.run_root)
    s3 = cfg.data.s3
    if not exists(paths.experts_summary, s3):
        raise ValueError(f"no trained models under {cfg.run_root}: run `mode-ray train` first")
    summary = read_json(paths.experts_summary, s3)
    suite = resolve_benchmark(cfg.eval.benchmark, s3)  # read once: its tasks now, its average after scoring
    tasks = check_eval_inputs(cfg, suite)
    moe = moe_usage.trained_moe(paths, s3)
    models = in_service(cfg, list(summary["models"])) + ([MOE] if moe is not None else [])
    present = expert_ids(models)
    if not present:
        raise ValueError(f"no data experts under {paths.experts()}: nothing to ensemble")
    singles = [m for m in (MOE, GENERALIST, MATCHED, SEED) if m in models]  # single models after the ensembles
    settings = settings_hash(
        cfg.eval.model_dump(mode="json"),
        [t.model_dump(mode="json") for t in tasks],
        cfg.embedding.encoder,
        summary,
        marker_info(paths.clusters, s3).get("run_id", ""),
        *([moe] if moe is not None else []),  # a run without a MoE keeps the hash it had before MoEs
    )
    return EvalPlan(summary, suite, tasks, eval_shards_corpus(cfg), moe, models, present, singles, settings)


def featurize_all(cfg: Config, plan: EvalPlan, log: StageLog) -> Features:
    """On Ray: every image source through every model (each source once, however many tasks read it), then
    the class prompts and captions of the tasks read from them."""
    from mode_ray.ray_env.resources import eval_needs
    from mode_ray.ray_env.runtime import ray_runtime, require_resources

    exports = {m: RunPaths(cfg.run_root).export(m) for m in plan.models}
    with ray_runtime(cfg):
        require_resources(cfg, eval_needs(cfg), "eval")
        sources: dict[str, Featurized] = {}
        for task in [*plan.tasks, *([plan.corpus_task] if plan.corpus_task else [])]:
            key = source_key(task)
            if key not in sources:
                log.info(f"image features of {len(plan.models)} models over {task.source} {task.location}")
                rows = featurize(cfg, task.source, task.location, exports)
                sources[key] = Featurized(rows, {m: embeddings_to_numpy(rows[f"f:{m}"]) for m in plan.models})
        data, corpora = task_inputs(cfg, plan, sources, log)
        texts = {c.name: c.corpus.texts for c in corpora}
        log.info(f"text features: {len(data)} tasks, {sum(map(len, texts.values()))} retrieval texts")
        per_task, per_caption, text_usage = text_features(
            cfg, exports, {d.name: (d.class_names, d.templates) for d in data}, texts
        )
    return Features(sources, data, corpora, per_task, per_caption, text_usage)


def run_eval(cfg: Config, force: bool = False) -> dict[str, Any]:
    paths = RunPaths(cfg.run_root)
    s3 = cfg.data.s3
    claim_run_root(cfg.run_root, s3)
    plan = plan_eval(cfg)
    with stage_log("eval") as log:
        if not force and stage_done(paths.eval, plan.settings, s3):
            log.skip("eval/ complete")
            return read_json(join(paths.eval, "summary.json"), s3)
        router = TaskRouter.from_run(cfg.run_root, cfg.embedding, cfg.eval.routing, s3)
        features = featurize_all(cfg, plan, log)
        result = write_results(cfg, plan, features, router, log)
        mark_done(paths.eval, plan.settings, s3)
        print_accuracy(result)
        log.done(f"report: {result['files']['md']}")
    return result
