"""One training job's trial: the `TorchTrainer` its DAG node (a Ray task) fits, and what it leaves behind:
metrics.json (with when it ran and where its seconds went), the model card, the completion marker.

No Ray Tune between the node and the trainer: with no search space and one trial per job, a Tune trial only
added an actor (a fresh process importing Ray Train), a placement group and 2–3 s to each job on 2 cores
(bench/train.py: an empty fit 11.2 s from a task, 13.1 s through Tune); the DAG runs the trials side by
side. Retries live at one level per failure: Ray Train restarts a job's worker group
(`training.run.max_failures`), the node's task is started again only if its own process dies.

A job resumes from its own latest checkpoint: Train V2 restores a run by name and storage path, and the
name is the job's settings hash, so the same settings resume and changed ones start afresh.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from mode_ray.config import Config, TrainingConfig
from mode_ray.models.card import write_card
from mode_ray.ray_env.runtime import release_orphaned_placement_groups
from mode_ray.run_root.layout import TRAIN_RECORD
from mode_ray.run_root.storage import join, mark_done, ray_storage, read_json, settings_hash, write_json
from mode_ray.train.inputs import InputSpec
from mode_ray.train.job import LoopRun, TrainJob


def train_run_name(job: TrainJob, settings: str) -> str:
    """Same settings, same name: a rerun resumes this Train run's checkpoints; changed settings start afresh."""
    return f"{job.name}-{settings[:10]}"


def failure_marker_path(cfg: Config, job_name: str) -> str:
    """Where the fail-once test hook records that it fired (a local temp file: it only guards a test aid)."""
    return os.path.join(tempfile.gettempdir(), "mode_ray_failures", settings_hash(cfg.run_root, job_name))


def tracking_spec(cfg: Config) -> dict[str, Any] | None:
    """What the loop's tracker needs: one experiment per run, named after the run root."""
    tr = cfg.tracking
    if not tr.report_to:
        return None
    experiment = f"mode_ray-{cfg.run_root.rstrip('/').rsplit('/', 1)[-1]}"
    return {**tr.model_dump(mode="json"), "experiment": experiment}


def ingest_options(t: TrainingConfig, datasets: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ingest defaults, with the training data's object store budget capped; a rank's training data
    keeps its order (Ray Data would hand blocks over as their tasks finish): the stream is a function of the
    job's seed alone, and an MCL rank's global batches are each one cluster."""
    from ray.train import DataConfig

    options = {}
    for name in datasets:
        opts = DataConfig.default_ingest_options()
        if name.startswith("train"):
            opts.resource_limits = opts.resource_limits.copy(object_store_memory=t.run.data_buffer_mb * 1024 * 1024)
            opts.preserve_order = True
        options[name] = opts
    return options


# A read task's output waits in the object store until the loop takes it, and Ray Data's resource allocator
# (`ReservationOpResourceAllocator`, op_resource_reservation_ratio 0.5) starts a task only when the operator's
# share of the budget holds the task's expected output beside the outputs still waiting: measured with
# bench/feed.py's stream (2 read tasks of ~1,000 rows of 256 px, ~190 MB an output), a budget of 128, 512 or 768 MB
# decoded about one task at a time, 1,024 MB two at once.
BUFFER_TASKS = 3  # task outputs of room the budget needs for each concurrent read task


def buffer_shortfall(t: TrainingConfig, spec: InputSpec) -> str | None:
    """Why the trial's read tasks would run fewer at once than `data_tasks_per_trial`, or None: each task's
    output (ROWS_PER_READ_TASK rows of pixels and tokens) must fit the training data's object-store budget
    with room to spare, or Ray Data holds back the next task until the loop has taken the last one."""
    from mode_ray.data.train_data import ROWS_PER_READ_TASK

    row = spec.load * spec.load * 3 + spec.context_length * 4 + 9  # uint8 pixels, int32 tokens, ok, coarse_id
    task_mb = ROWS_PER_READ_TASK * row / 2**20
    needed = math.ceil(BUFFER_TASKS * t.run.data_tasks_per_trial * task_mb)
    if t.run.data_buffer_mb >= needed:
        return None
    return (
        f"training.run.data_buffer_mb={t.run.data_buffer_mb} is short of what {t.run.data_tasks_per_trial} read "
        f"tasks need at once ({ROWS_PER_READ_TASK:,} rows of {spec.load} px: ~{task_mb:.0f} MB a task): Ray Data will "
        f"run fewer of a trial's reads at once; set it to {needed} or more to feed at full speed"
    )


def job_data(cfg: Config, job: TrainJob, spec: InputSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's datasets: an MCL stage reads each rank's planned rows in order; every other job draws its
    rows (all, or its partition plus the out-of-cluster share)."""
    from mode_ray.data.train_data import job_datasets, mcl_datasets

    t = cfg.training
    if job.data.kind == "mcl":
        ranks = {r: job.steps * (t.batch_size // t.run.num_workers) for r in range(t.run.num_workers)}
        return mcl_datasets(cfg, join(job.paths.out_dir, "plan.npz"), ranks, spec), {}
    return job_datasets(cfg, job, t.seed + sum(map(ord, job.name)), spec)


def set_train_environment(t: TrainingConfig, embedded_ray: bool) -> None:
    """Read by the Train controller this trial starts (Ray Train propagates it from the trial's environment)."""
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(t.run.controller_poll_s)
    if embedded_ray:
        # An embedded one-node Ray: no node can be preempted and nobody scrapes Train's metrics, so the
        # preemption watcher actor and the metrics callbacks would only cost each trial CPU and a process.
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        os.environ["RAY_TRAIN_METRICS_ENABLED"] = "0"


def trainer_class(embedded_ray: bool) -> type:
    """`TorchTrainer` without the callbacks that only start processes this runner has no use for.

    - Its datasets callback: Train starts a `DatasetManager` actor in every trial, datasets or none — a fresh
      process importing Ray Data (~1.5 core-s on 2 cores) — to hand out shards of the trainer's `datasets`.
      The runner passes none: each worker opens its rank's stream itself (`mode_ray.data.rank_data`), and
      every dataset carries its own Ray Data context, which the callback would otherwise copy to the workers.
    - On an embedded Ray, its placement-group cleaner: a detached actor that removes a worker group's
      placement group should the controller die. Train starts it — a fresh process that imports Ray Train —
      and waits for it before the worker group starts, ~3 s of every trial here (an empty fit: 12.3 → 9.2 s).
      On an embedded Ray nothing outlives the driver, and each trial already releases an orphaned group first
      (`release_orphaned_placement_groups`); on a cluster the cleaner stays."""
    from ray.train.torch import TorchTrainer

    try:  # Ray Train's own callbacks, not public API: where they move, every trial keeps them
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    unused = (DatasetsCallback, PlacementGroupCleanerCallback) if embedded_ray else (DatasetsCallback,)

    class RunnerTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            if self.datasets:  # given datasets after all (not by this runner): they need the callback
                return super()._create_default_callbacks()
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unused)]

    return RunnerTorchTrainer


@dataclass(frozen=True)
class TrialSpec:
    """One job's trial, complete: what it trains, the samples per epoch its checkpoints count in, and what the
    runner passes through (threads per worker, the model's input spec, the progress board, when it launched)."""

    job: TrainJob
    settings: str
    samples_per_epoch: float
    torch_threads: int
    input_spec: InputSpec
    embedded_ray: bool
    progress_board: str
    started_at: float  # when the runner launched the job (Unix seconds), kept in its metrics.json
    facts: dict[str, Any] = field(default_factory=dict)  # an MCL stage's plan, for its metrics.json


def loop_run(cfg: Config, spec: TrialSpec, holdout: bool) -> LoopRun:
    """How this job's loop runs: its checkpoint interval in its own steps, the fail-once hook, tracking."""
    t = cfg.training
    return LoopRun(
        torch_threads=spec.torch_threads,
        checkpoint_every_steps=t.run.checkpoint_every_epochs * spec.samples_per_epoch / t.batch_size,
        log_every_steps=t.run.log_every_steps,
        holdout=holdout,
        s3=cfg.data.s3.model_dump(),
        fail_once_at_step=(t.run.fail_once_at_step or {}).get(spec.job.name),
        failure_marker=failure_marker_path(cfg, spec.job.name),
        tracking=tracking_spec(cfg),
        deterministic=t.run.deterministic,
    )


def fit_job(cfg: Config, spec: TrialSpec) -> dict[str, Any]:
    """Build and fit the job's TorchTrainer, then record what it did; returns its metrics.json."""
    trial_start = time.time()
    import ray.train

    from mode_ray.data.data_backoff import quiet_training_data
    from mode_ray.data.rank_data import with_ingest_options
    from mode_ray.train.ray_adapter import train_loop_per_worker

    job, t = spec.job, cfg.training
    set_train_environment(t, spec.embedded_ray)
    quiet_training_data()
    release_orphaned_placement_groups()  # an earlier, killed attempt's worker group still holds its CPUs
    datasets, facts = job_data(cfg, job, spec.input_spec)
    run = loop_run(cfg, spec, holdout="holdout" in datasets)
    storage_path, filesystem = ray_storage(join(cfg.run_root, "train_runs"), cfg.data.s3)
    trainer = trainer_class(spec.embedded_ray)(
        train_loop_per_worker,
        train_loop_config={
            "job": job,
            "run": run,
            "progress_board": spec.progress_board,
            "datasets": with_ingest_options(datasets, ingest_options(t, datasets)),  # every rank reads its own
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.run.num_workers, use_gpu=t.run.use_gpu, resources_per_worker={"CPU": t.run.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name(job, spec.settings),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=t.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    fit_start = time.time()
    trainer.fit()
    trial = {"trial_start": trial_start, "fit_start": fit_start, "fit_end": time.time()}
    return finalize_job(cfg, spec, run, {**spec.facts, **facts}, trial)


def time_breakdown(record: dict[str, Any], trial: dict[str, float], done: float) -> dict[str, float]:
    """Where a trial's seconds went: everything but `compute` is fixed cost the model learns nothing from.

    Wall-clock stamps from the trial and its worker (the same machine on one node; on a cluster, clocks
    are assumed in sync). After a worker restart the stamps are the last attempt's."""
    stamps, inside = record["stamps"], record["worker_seconds"]
    first_batch = stamps.get("first_batch", stamps["model_ready"])
    parts = {
        "ray_train_start": stamps["worker_start"] - trial["fit_start"],
        "imports": stamps["imports_done"] - stamps["worker_start"],
        "model_build_and_resume": stamps["model_ready"] - stamps["imports_done"],
        "data_start": first_batch - stamps["model_ready"],
        "compute": inside["compute"],
        "data_wait": inside["data_wait"] - (first_batch - stamps["model_ready"]) if "first_batch" in stamps else 0.0,
        "validation": inside["validation"],
        "checkpoint_and_report": inside["checkpoint"],
        "export": record["export_seconds"],
        "ray_train_end": trial["fit_end"] - stamps["outputs_written"],
        "trial_setup": trial["fit_start"] - trial["trial_start"],
        "finalize": done - trial["fit_end"],
    }
    parts = {k: max(0.0, v) for k, v in parts.items()}
    total = done - trial["trial_start"]
    return {**parts, "other": max(0.0, total - sum(parts.values())), "trial": total, "fixed": total - parts["compute"]}


def finalize_job(
    cfg: Config, spec: TrialSpec, run: LoopRun, facts: dict[str, Any], trial: dict[str, float]
) -> dict[str, Any]:
    """metrics.json from the worker's record and the trial's timing, then the card and the completion marker."""
    job, out, s3 = spec.job, spec.job.paths.out_dir, cfg.data.s3
    record = read_json(join(out, TRAIN_RECORD), s3)
    seen = {k: int(v) for k, v in record["seen"].items()}
    done = time.time()
    metrics = {
        "job": job.summary(),
        "model": job.inputs.model,
        "started_at": spec.started_at,  # when the runner launched it (Unix seconds), and when it ended
        "ended_at": done,
        "steps": record["end_step"] - record["start_step"],
        "start_step": record["start_step"],
        "end_step": record["end_step"],
        "batch_size": job.inputs.batch_size,
        "samples_per_epoch": spec.samples_per_epoch,
        "samples_seen": sum(seen.values()),
        "samples_seen_by_cluster": seen,
        **{k: record[k] for k in ("executions", "first_lr", "skipped_images", "loss_history", "val_history")},
        "recovery": record.get("recovery", []),  # unreadable checkpoints skipped on the way
        "resumed_at_steps": record.get("resumed_at_steps", []),  # each restarted attempt's first step
        "weights_sha256_by_rank": record["weights_sha256_by_rank"],  # equal at any worker count (DDP)
        "torch_threads": run.torch_threads,
        **facts,
    }
    metrics["timing"] = time_breakdown(record, trial, done)
    write_json(join(out, "metrics.json"), metrics, s3)
    if job.role == "model":  # a model of the run (not a CLIP-MoE step): its export gets a model card
        write_card(cfg, job.name)
    mark_done(out, spec.settings, s3, **job.marker)
    return metrics
