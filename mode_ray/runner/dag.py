"""One runner for every training job: a DAG of `TrainJob`s, each started as soon as its parents are complete
and a slot is free — the experts and generalists after the seed, MCL stage 1 as soon as the MoE's base
exists, the router after the last stage, added experts after the seed — so the MoE branch trains beside the
expert tails, on a laptop and on a cluster.

Each job runs in a small Ray task (no CPU of its own), its driver: it plans its data when that needs its
parent (an MCL stage clusters with the previous stage's model), then fits the job's `TorchTrainer`
(`mode_ray.runner.trial`). A job whose `_SUCCESS` matches its settings hash is never run again; an unfinished
one resumes from its own Train checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from rich.markup import escape

from mode_ray.config import Config
from mode_ray.console.progress import StageLog, error_reason, stage_log
from mode_ray.console.progress_bars import progress_bars
from mode_ray.ray_env.resources import training_needs
from mode_ray.ray_env.runtime import cluster_address, release_orphaned_placement_groups, require_resources
from mode_ray.run_root.ownership import claim, remove_owned_tree
from mode_ray.run_root.storage import join, marker_info, stage_done
from mode_ray.runner.trial import TrialSpec, buffer_shortfall, fit_job, train_run_name
from mode_ray.train.inputs import InputSpec, input_spec
from mode_ray.train.job import TrainJob, critical_path, job_hashes


def job_done(cfg: Config, job: TrainJob, settings: str) -> bool:
    """Complete with these settings, or retrained since by `add-data --refresh-experts` from a model that was
    (its marker keeps the settings `train` knows it by, so `train` does not undo the refresh)."""
    out = job.paths.out_dir
    if stage_done(out, settings, cfg.data.s3):
        return True
    try:
        return marker_info(out, cfg.data.s3).get("train_settings") == settings
    except (OSError, ValueError):
        return False


def claim_job_folders(cfg: Config, jobs: list[TrainJob], hashes: dict[str, str], force: bool) -> None:
    """Each job's output folder and Ray Train run folder, claimed before its trial writes there (so a later
    --force or rollback may delete them); under --force the Train run starts from nothing."""
    for job in jobs:
        claim(job.paths.out_dir, f"model {job.name}", cfg.data.s3)
        train_run = join(cfg.run_root, "train_runs", train_run_name(job, hashes[job.name]))
        if force:  # nothing to resume: --force means from the start
            remove_owned_tree(train_run, cfg.data.s3)
        claim(train_run, f"Ray Train run of {job.name}", cfg.data.s3)


def max_concurrent(cfg: Config) -> int:
    """Jobs side by side: the configured count, or as many trials as the cluster's CPUs (GPUs) hold."""
    import ray

    t = cfg.training
    if t.run.max_concurrent_trials:
        return t.run.max_concurrent_trials
    resources = ray.cluster_resources()
    if t.run.use_gpu:
        return max(1, int(resources.get("GPU", 0) // t.run.num_workers))
    per_trial = t.run.num_workers * t.run.cpus_per_worker + t.run.data_cpus_per_trial
    return max(1, int(resources.get("CPU", 1) // per_trial))


def torch_threads(cfg: Config, concurrent: int) -> int:
    """The configured count, or this node's CPUs shared by the trials running side by side."""
    import ray

    if cfg.training.run.torch_threads:
        return cfg.training.run.torch_threads
    cpus = ray.cluster_resources().get("CPU", 1) / max(1, len(ray.nodes()))
    return max(1, int(cpus // (concurrent * cfg.training.run.num_workers)))


@dataclass(frozen=True)
class Shared:
    """What every job's trial gets besides its job: the config (as JSON, validated once per process), how
    jobs run, the stage's progress board."""

    cfg_json: str
    samples_per_epoch: float
    torch_threads: int
    input_spec: InputSpec
    embedded_ray: bool
    board: str


@lru_cache(maxsize=2)
def load_config(cfg_json: str) -> Config:
    """The run's config, validated once per process (a node's worker process runs job after job)."""
    return Config.model_validate_json(cfg_json)


def run_node(job: TrainJob, settings: str, shared: Shared, started_at: float) -> dict[str, Any]:
    """A Ray task, the job's driver: plan an MCL stage's batches (its parent's model is ready now), then fit the
    job's `TorchTrainer`. `started_at`: when the runner launched it (Unix seconds), kept in its metrics.json."""
    cfg = load_config(shared.cfg_json)
    facts, spe = {}, shared.samples_per_epoch
    if job.data.mcl is not None:
        from mode_ray.data.mcl_plan import prepare_stage

        stage = job.data.mcl.stage
        facts = prepare_stage(cfg, stage, job.paths.data_model, cfg.training.seed + stage)
        job = job.with_steps(facts["steps"])
        spe = facts["steps"] * cfg.training.batch_size / job.data.mcl.epochs
    spec = TrialSpec(
        job=job,
        settings=settings,
        samples_per_epoch=spe,
        torch_threads=shared.torch_threads,
        input_spec=shared.input_spec,
        embedded_ray=shared.embedded_ray,
        progress_board=shared.board,
        started_at=started_at,
        facts=facts,
    )
    fit_job(cfg, spec)
    return facts


def pending_jobs(
    cfg: Config, jobs: list[TrainJob], force: bool, known: dict[str, str] | None = None
) -> tuple[dict[str, str], list[TrainJob]]:
    """(every job's settings hash, the jobs not complete with theirs)."""
    hashes = job_hashes(jobs, known)
    return hashes, [j for j in jobs if force or not job_done(cfg, j, hashes[j.name])]


def run_jobs(
    cfg: Config, jobs: list[TrainJob], spe: float, force: bool, log: StageLog, known: dict[str, str] | None = None
) -> list[str]:
    """Train every job of the DAG that is not complete; returns the names trained now. `spe`: the run's
    samples per epoch (MCL stages count their own); `known`: settings hashes of complete parents outside
    `jobs` (add-data's seed, a standalone MoE's base)."""
    hashes, todo = pending_jobs(cfg, jobs, force, known)
    if not todo:
        return []
    require_resources(cfg, training_needs(cfg), log.name)
    claim_job_folders(cfg, todo, hashes, force)
    most = max_concurrent(cfg)
    concurrent = min(len(todo), most)
    spec, embedded = input_spec(cfg.training.model), cluster_address(cfg) is None
    if shortfall := buffer_shortfall(cfg.training, spec):
        log.info(shortfall)
    with progress_bars(log.name) as board:
        # Threads from the whole DAG, not what is left of it: a resumed run keeps them, and with them its bytes.
        threads = torch_threads(cfg, min(len(jobs), most))
        shared = Shared(cfg.model_dump_json(), float(spe), threads, spec, embedded, board)
        try:
            return drive(todo, hashes, shared, concurrent, log, cfg.training.run.max_failures)
        finally:  # a killed trial's worker group would hold its CPUs until the command ends
            if released := release_orphaned_placement_groups():
                log.info(f"released {released} placement group(s) left by killed trials")


def train_stage(
    cfg: Config,
    title: str,
    jobs: list[TrainJob],
    spe: float,
    force: bool,
    what: str,
    complete: str,
    known: dict[str, str] | None = None,
) -> list[str]:
    """The one way a stage trains (train, moe, add-data): its console line, the jobs of the DAG not complete
    trained (`run_jobs`), and what it did — "N `what`" — or `complete` when nothing was left."""
    with stage_log(title) as log:
        trained = run_jobs(cfg, jobs, spe, force, log, known)
        if trained:
            log.done(f"{len(trained)} {what}")
        else:
            log.skip(complete)
    return trained


def drive(
    todo: list[TrainJob], hashes: dict[str, str], shared: Shared, concurrent: int, log: StageLog, retries: int
) -> list[str]:
    """Start every job whose parents are complete, longest chain first, up to `concurrent` at once; a failed
    job's descendants never start, the others finish; then its error is raised. `retries`: how often a job's
    driver task is started again if its process dies (`training.run.max_failures`)."""
    import ray

    # A driver killed mid-job is started again (its Train run resumes from its checkpoints); an exception is not.
    node = ray.remote(num_cpus=0, max_retries=retries)(run_node)
    depth, order = critical_path(todo), {j.name: i for i, j in enumerate(todo)}
    pending = sorted(todo, key=lambda j: (-depth[j.name], order[j.name]))
    waiting = {j.name for j in todo}
    running: dict[Any, tuple[TrainJob, float]] = {}
    done, failed, t0 = [], {}, time.time()
    while pending or running:
        for job in [j for j in pending if not waiting & set(j.parents)][: concurrent - len(running)]:
            pending = [j for j in pending if j is not job]
            started = time.time()
            running[node.remote(job, hashes[job.name], shared, started)] = (job, started)  # its bar says it started
        if not running:  # what is left waits on a job that failed
            break
        [ref], _ = ray.wait(list(running), num_returns=1)
        job, started = running.pop(ref)
        try:
            facts = ray.get(ref)
        except Exception as err:  # noqa: BLE001 — reported with every other failure at the end
            failed[job.name] = error_reason(str(err))
            log.info(f"[red]{job.name} failed[/red]: {escape(failed[job.name])}")
            continue
        waiting.discard(job.name)
        done.append(job.name)
        took = f"{job.name} done in {time.time() - started:.0f}s, started at +{started - t0:.0f}s"
        log.info(took + (f" ({describe(facts)})" if facts else ""))
    if failed or pending:
        never = [j.name for j in pending]
        raise RuntimeError(
            f"{len(failed)} training job(s) failed: {failed}" + (f"; not started: {never}" if never else "")
        )
    return done


def describe(facts: dict[str, Any]) -> str:
    """An MCL stage's plan in one line."""
    return (
        f"{facts['rows']:,} pairs in {len(facts['clusters'])} accumulated clusters; {facts['rows_in_small_clusters']} "
        f"pairs in {len(facts['small_clusters'])} clusters smaller than a batch (not trained on); "
        f"{facts['steps']} steps"
    )
