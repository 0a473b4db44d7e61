"""Training as Ray Tune trials, each fitting one Ray Train `TorchTrainer`.

    phase 1: seed          all of the manifest, epochs [0, seed_end)
    phase 2: expert-e      partition e + an `ooc_ratio` share of the others (redrawn each pass), from the seed
             generalist    all of the manifest, from the seed: the dense baseline at the same total budget

A job whose `experts/NAME/_SUCCESS` matches its settings is never retrained; an unfinished one resumes
from its own latest checkpoint (Train V2 restores a run by name and storage path); an interrupted Tune
experiment is restored with `Tuner.restore(..., resume_errored=True)`. Adding an expert trains only it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mode_ray.config import Config
from mode_ray.layout import RunPaths
from mode_ray.progress import console, stage_log
from mode_ray.storage import (
    arrow_filesystem,
    exists,
    get_fs,
    join,
    mark_done,
    read_json,
    settings_hash,
    stage_done,
    write_json,
)
from mode_ray.train.loop import STATE_FILE


@dataclass(frozen=True)
class Job:
    name: str  # seed | expert-{e} | generalist
    expert: int | None  # coarse cluster for a data expert
    epoch_start: float
    epoch_end: float
    init_from_seed: bool


def experts_dir(cfg: Config, name: str = "") -> str:
    return RunPaths(cfg.run_root).experts(name)


def plan_jobs(cfg: Config, per_expert: dict[str, int]) -> tuple[Job | None, list[Job], list[int]]:
    """(seed job or None, tail jobs, empty experts skipped) from the schedule and the manifest counts."""
    t = cfg.training
    seed_end = t.epochs * t.seed_fraction if t.use_seed and t.seed_fraction > 0 else 0.0
    seed = Job("seed", None, 0.0, seed_end, False) if seed_end > 0 else None
    from_seed = seed is not None
    tails = []
    empty = []
    for e in range(cfg.clustering.n_coarse):
        if per_expert.get(str(e), 0) == 0:
            empty.append(e)
            continue
        tails.append(Job(f"expert-{e}", e, seed_end, t.epochs, from_seed))
    tails.append(Job("generalist", None, seed_end, t.epochs, from_seed))
    return seed, tails, empty


def job_hash(cfg: Config, job: Job, manifest_run_id: str) -> str:
    return settings_hash(cfg.training.model_dump(mode="json"), asdict(job), manifest_run_id)


# --------------------------------------------------------------------------- data


DATA_TASK_CPUS = 0.25  # small, so data tasks of concurrent trials still fit beside the training workers


def _coarse_ids(batch: pa.Table) -> np.ndarray:
    """The hive partition column comes back as a string: make it the integer it is."""
    return np.asarray(pc.cast(batch["coarse_id"], pa.int32()).to_numpy(zero_copy_only=False))


def _own_plus_share(batch: pa.Table, expert: int, ratio: float) -> pa.Table:
    """An expert's rows: all of its cluster plus each other row with probability `ratio`, drawn afresh on
    every pass (the reference redraws its out-of-cluster share per epoch)."""
    coarse = _coarse_ids(batch)
    keep = (coarse == expert) | (np.random.default_rng().random(len(batch)) < ratio)
    return batch.filter(pa.array(keep))


def training_dataset(cfg: Config, job: Job, per_expert: dict[str, int]) -> tuple[Any, int]:
    """The job's Ray Dataset (decoded, transformed, tokenised) and its expected rows per pass."""
    import ray

    manifest = RunPaths(cfg.run_root).manifest
    ds = ray.data.read_parquet(
        manifest,
        columns=["image", "caption", "coarse_id"],
        filesystem=arrow_filesystem(manifest, cfg.data.s3),
        num_cpus=DATA_TASK_CPUS,
    )
    total = sum(per_expert.values())
    if job.expert is None:
        rows = total
    else:
        ratio = cfg.training.ooc_ratio
        ds = ds.map_batches(
            _own_plus_share,
            fn_kwargs={"expert": job.expert, "ratio": ratio},
            batch_format="pyarrow",
            num_cpus=DATA_TASK_CPUS,
        )
        own = per_expert[str(job.expert)]
        rows = own + round(ratio * (total - own))
    if cfg.training.shuffle:
        ds = ds.randomize_block_order()  # plus a local shuffle buffer in the loop: no all-to-all shuffle
    ds = ds.map_batches(
        preprocess_batch,
        fn_kwargs={"model_name": cfg.training.model},
        batch_format="pyarrow",
        batch_size=256,
        num_cpus=DATA_TASK_CPUS,
    )
    return ds, rows


def preprocess_batch(batch: pa.Table, model_name: str) -> dict[str, np.ndarray]:
    """Decode + open_clip train transform + tokenise; an image that fails to decode is flagged, not fatal."""
    from mode_ray.train.transforms import clip_inputs

    coarse = _coarse_ids(batch)
    return clip_inputs(batch["image"].to_pylist(), batch["caption"].to_pylist(), coarse, model_name)


# --------------------------------------------------------------------------- one trial


def run_job_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: build and fit one TorchTrainer for one job, then export its model."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from mode_ray.train.loop import train_loop_per_worker

    cfg = Config.model_validate(config["cfg"])
    job = Job(**config["job"])
    per_expert: dict[str, int] = config["per_expert"]
    t = cfg.training
    ds, rows = training_dataset(cfg, job, per_expert)
    runs = join(cfg.run_root, "train_runs")
    loop_cfg = {
        **t.model_dump(mode="json"),
        "job": job.name,
        "global_batch": t.batch_size,
        "epoch_start": job.epoch_start,
        "epoch_end": job.epoch_end,
        "total_epochs": t.epochs,
        "rows_per_epoch": rows,
        "n_coarse": cfg.clustering.n_coarse,
        "init_state": join(experts_dir(cfg, "seed"), STATE_FILE) if job.init_from_seed else None,
        "s3": cfg.data.s3.model_dump(),
        "failure_marker": failure_marker_path(cfg, job.name),
        "fail_once_at_step": t.fail_once_at_step.get(job.name) if t.fail_once_at_step else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            # Same settings, same name: a rerun resumes this run's checkpoints; changed settings start afresh.
            name=f"{job.name}-{config['settings'][:10]}",
            storage_path=runs,
            storage_filesystem=arrow_filesystem(runs, cfg.data.s3),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": ds},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{job.name}: training finished without a checkpoint")
    metrics = finalize_job(cfg, job, result.checkpoint, rows, config["settings"])
    ray.tune.report({"done": 1, "loss": metrics["loss_history"][-1], "samples_seen": metrics["samples_seen"]})


def failure_marker_path(cfg: Config, job_name: str) -> str:
    """Where the fail-once test hook records that it fired (a local temp file: it only guards a test aid)."""
    return os.path.join(tempfile.gettempdir(), "mode_ray_failures", settings_hash(cfg.run_root, job_name))


def finalize_job(cfg: Config, job: Job, checkpoint: Any, rows: int, settings: str) -> dict[str, Any]:
    """Copy the final training state, export a stock-open_clip checkpoint, record what the model saw."""
    from mode_ray.models.clip import build_clip, export_open_clip
    from mode_ray.train.loop import load_state

    out = experts_dir(cfg, job.name)
    fs, path = get_fs(out, cfg.data.s3)
    fs.makedirs(path, exist_ok=True)
    with checkpoint.as_directory() as d:
        local_state = os.path.join(d, STATE_FILE)
        fs.put(local_state, f"{path}/{STATE_FILE}")
        model, _, _, _ = build_clip(cfg.training.model)
        state = load_state(local_state, model, None, None)
    export_open_clip(model.eval(), cfg.training.model, join(out, "export"), cfg.data.s3)
    metrics = {
        "job": asdict(job),
        "model": cfg.training.model,
        "steps": state["step"] - state["init_step"],
        "start_step": state["init_step"],
        "end_step": state["step"],
        "passes": state["passes"],
        "samples_seen": int(sum(state["seen"].values())),
        "samples_seen_by_cluster": state["seen"],
        "rows_per_pass_expected": rows,
        "skipped_images": state["skipped_images"],
        "loss_history": state["loss_history"],
    }
    write_json(join(out, "metrics.json"), metrics, cfg.data.s3)
    mark_done(out, settings, cfg.data.s3)
    return metrics


# --------------------------------------------------------------------------- orchestration


def _max_concurrent(cfg: Config) -> int:
    import ray

    t = cfg.training
    resources = ray.cluster_resources()
    if t.use_gpu:
        return max(1, int(resources.get("GPU", 0) // t.num_workers))
    # Each trial also streams its own Ray Data pipeline, whose file listing alone takes a whole CPU: a trial
    # that cannot get it would wait forever, so concurrency counts the data CPUs too.
    per_trial = t.num_workers * t.cpus_per_worker + t.data_cpus_per_trial
    return max(1, int(resources.get("CPU", 1) // per_trial))


def run_phase(cfg: Config, phase: str, jobs: list[Job], per_expert: dict[str, int], settings: dict[str, str]) -> None:
    import ray.tune as tune

    if not jobs:
        return
    tune_root = join(cfg.run_root, "tune")
    name = f"{phase}-{settings_hash(sorted(j.name for j in jobs), sorted(settings.values()))}"
    # The trial only drives its TorchTrainer; its workers ask for their own CPUs/GPUs.
    trainable = tune.with_resources(run_job_trial, {"CPU": 0.01})
    fs = arrow_filesystem(tune_root, cfg.data.s3)
    exp_path = join(tune_root, name)
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs):
        console.print(f"  resuming Tune experiment {exp_path}")
        tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "job": tune.grid_search([asdict(j) for j in jobs]),
                "cfg": cfg.model_dump(mode="json"),
                "per_expert": per_expert,
                "settings": tune.sample_from(lambda spec: settings[spec.config["job"]["name"]]),
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=min(len(jobs), _max_concurrent(cfg)),
                trial_name_creator=lambda trial: trial.config["job"]["name"],
                trial_dirname_creator=lambda trial: trial.config["job"]["name"],
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=tune_root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.training.max_failures),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} training trial(s) failed: " + "; ".join(str(r.error)[:300] for r in failed))


def run_train(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Seed, then every data expert and the generalist as parallel trials; skips finished models."""
    from mode_ray.runtime import ray_runtime

    paths = RunPaths(cfg.run_root)
    if not exists(paths.prep_summary, cfg.data.s3):
        raise ValueError(f"no prep output under {cfg.run_root}: run `mode-ray prep` first")
    prep = read_json(paths.prep_summary, cfg.data.s3)
    per_expert = prep["per_expert"]
    manifest_run = prep.get("manifest_run_id", "")
    seed, tails, empty = plan_jobs(cfg, per_expert)
    for e in empty:
        console.print(f"[yellow]expert-{e}: empty partition, skipped[/yellow]")
    settings = {j.name: job_hash(cfg, j, manifest_run) for j in ([seed] if seed else []) + tails}
    if seed is not None:  # the tails continue this very seed: a new seed means new tails
        settings = {n: s if n == "seed" else settings_hash(s, settings["seed"]) for n, s in settings.items()}

    def pending(jobs: list[Job]) -> list[Job]:
        return [j for j in jobs if force or not stage_done(experts_dir(cfg, j.name), settings[j.name], cfg.data.s3)]

    with ray_runtime(cfg):
        with stage_log("train: seed") as log:
            todo = pending([seed]) if seed else []
            if seed is None:
                log.skip("training.use_seed is off: experts train from scratch")
            elif not todo:
                log.skip("experts/seed complete")
            else:
                run_phase(cfg, "seed", todo, per_expert, settings)
                log.done(f"epochs [0, {seed.epoch_end:g})")
        with stage_log("train: experts + generalist") as log:
            todo = pending(tails)
            if not todo:
                log.skip("all models complete")
            else:
                log.info("training " + ", ".join(j.name for j in todo) + " as parallel Tune trials")
                run_phase(cfg, "tails", todo, per_expert, settings)
                log.done(f"{len(todo)} models")
    summary = training_summary(cfg, ([seed] if seed else []) + tails, empty)
    write_json(RunPaths(cfg.run_root).experts_summary, summary, cfg.data.s3)
    print_training_summary(summary)
    return summary


def training_summary(cfg: Config, jobs: list[Job], empty: list[int]) -> dict[str, Any]:
    models = {j.name: read_json(join(experts_dir(cfg, j.name), "metrics.json"), cfg.data.s3) for j in jobs}
    seed_seen = models["seed"]["samples_seen"] if "seed" in models else 0
    tails = [n for n in models if n.startswith("expert-")]
    return {
        "models": models,
        "empty_experts_skipped": empty,
        "compute_samples": {
            "seed": seed_seen,
            "mode_total": seed_seen + sum(models[n]["samples_seen"] for n in tails),
            "generalist_total": seed_seen + models["generalist"]["samples_seen"] if "generalist" in models else None,
        },
    }


def print_training_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="trained models")
    for col in ("model", "from step", "steps", "samples seen", "loss first → last"):
        table.add_column(col)
    for name, m in summary["models"].items():
        losses = m["loss_history"]
        table.add_row(
            name,
            str(m["start_step"]),
            str(m["steps"]),
            str(m["samples_seen"]),
            f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "-",
        )
    console.print(table)
    c = summary["compute_samples"]
    console.print(f"compute (samples): MoDE total {c['mode_total']}, generalist total {c['generalist_total']}")
