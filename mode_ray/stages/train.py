"""Training as Ray Tune trials, each fitting one Ray Train `TorchTrainer`.

    phase 1: seed                all of the manifest, steps [0, S)
    phase 2: expert-e            partition e + an `ooc_ratio` share of the others, steps [S, S + T), from the seed
             generalist          all of the manifest, steps [S, S + T), from the seed: the dense baseline
             generalist-matched  all of the manifest, steps [S, S + n·T), from the seed: as much compute as
                                 the whole ensemble (seed + n tails) — the control a sceptic asks for first

Every model counts its schedule in samples of one global batch (`mode_ray.train.schedule`). A job whose
`experts/NAME/_SUCCESS` matches its settings is never retrained; an unfinished one resumes from its own
latest checkpoint (Train V2 restores a run by name and storage path); an interrupted Tune experiment is
restored with `Tuner.restore(..., resume_errored=True)`. Adding an expert trains only it (and the matched
control, whose budget grows with it).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

from mode_ray.config import Config
from mode_ray.layout import RunPaths
from mode_ray.models.card import write_card
from mode_ray.models.pretrained import check_architecture, resolve_pretrained
from mode_ray.ownership import claim, claim_run_root, fresh_dir, remove_owned_tree
from mode_ray.progress import console, stage_log, verbose
from mode_ray.progress_bars import progress_bars
from mode_ray.resources import training_needs
from mode_ray.runtime import cluster_address, require_resources
from mode_ray.stages.train_data import build_generation_caches, build_input_cache, input_cache_dir, job_datasets
from mode_ray.storage import (
    arrow_filesystem,
    exists,
    join,
    mark_done,
    marker_info,
    read_json,
    settings_hash,
    stage_done,
    write_json,
)
from mode_ray.train.loop import STATE_FILE
from mode_ray.train.schedule import SEED, Job, Plan, plan_training
from mode_ray.train.transforms import InputSpec, input_spec

TRAIN_RECORD = "train_record.json"


def experts_dir(cfg: Config, name: str = "") -> str:
    return RunPaths(cfg.run_root).experts(name)


def samples_per_epoch(cfg: Config, manifest_rows: int) -> int:
    """The configured epoch, or the manifest's training rows (the hold-out never trains)."""
    from mode_ray.stages.train_data import holdout_fraction

    if cfg.training.samples_per_epoch:
        return cfg.training.samples_per_epoch
    return max(1, round(manifest_rows * (1 - holdout_fraction(cfg, manifest_rows))))


def make_plan(cfg: Config, per_expert: dict[str, int]) -> Plan:
    t = cfg.training
    return plan_training(
        epochs=t.epochs,
        seed_fraction=t.seed_fraction,
        samples_per_epoch=samples_per_epoch(cfg, sum(per_expert.values())),
        batch_size=t.batch_size,
        base_lr=t.lr,
        warmup_steps=t.warmup_steps,
        per_expert=per_expert,
        n_coarse=cfg.clustering.n_coarse,
        use_seed=t.use_seed,
        matched_control=t.matched_control,
        decay_after_warmup=t.lr_decay == "after_warmup",
    )


def model_done(cfg: Config, name: str, settings: str) -> bool:
    """Complete with these settings, or retrained since by `add-data --refresh-experts` from a model that was
    (its marker keeps the settings `train` knows it by, so `train` does not undo the refresh)."""
    out = experts_dir(cfg, name)
    if stage_done(out, settings, cfg.data.s3):
        return True
    try:
        return marker_info(out, cfg.data.s3).get("train_settings") == settings
    except (OSError, ValueError):
        return False


def job_hash(cfg: Config, plan: Plan, job: Job, manifest_run_id: str) -> str:
    return settings_hash(cfg.training.learning_settings(), asdict(job), plan.schedule.settings(), manifest_run_id)


# --------------------------------------------------------------------------- one trial


def run_job_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: build and fit one TorchTrainer for one job, then record what it did."""
    trial_start = time.time()
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from mode_ray.stages.data_backoff import quiet_training_data
    from mode_ray.train.loop import train_loop_per_worker

    cfg = Config.model_validate(config["cfg"])
    job = Job(**config["job"])
    task = config.get("task") or {}  # CLIP-MoE jobs: their data plan, loop settings and output folder
    t = cfg.training
    spe = config["samples_per_epoch"]
    # Read by the Train controller this trial starts (Ray Train propagates it from the driver's environment).
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(t.controller_poll_s)
    if config.get("embedded_ray"):
        # An embedded one-node Ray: no node can be preempted and nobody scrapes Train's metrics, so the
        # preemption watcher actor and the metrics callbacks would only cost each trial CPU and a process.
        os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        os.environ["RAY_TRAIN_METRICS_ENABLED"] = "0"
    quiet_training_data()
    spec = InputSpec(**config["input_spec"])
    if task.get("plan"):  # an MCL stage: each worker reads its planned share of every global batch, in order
        from mode_ray.stages.train_data import mcl_datasets

        datasets, facts = mcl_datasets(cfg, task["plan"], {int(r): n for r, n in task["ranks"].items()}, spec), {}
    else:
        datasets, facts = job_datasets(cfg, job, t.seed + sum(map(ord, job.name)), spec)
    out_dir = task.get("out_dir") or experts_dir(cfg, job.name)
    runs = join(cfg.run_root, "train_runs")
    loop_cfg = {
        **t.model_dump(mode="json"),
        "job": asdict(job),
        "schedule": config["schedule"],
        "global_batch": t.batch_size,
        "checkpoint_every_steps": t.checkpoint_every_epochs * spe / t.batch_size,
        "n_coarse": cfg.clustering.n_coarse,
        "holdout": "holdout" in datasets,
        "torch_threads": config["torch_threads"],
        "init_state": join(experts_dir(cfg, SEED), STATE_FILE) if job.init_from_seed else None,
        "init_export": None if job.init_from_seed else config.get("init_export"),  # training.init, resolved
        "out_dir": out_dir,
        "s3": cfg.data.s3.model_dump(),
        "failure_marker": failure_marker_path(cfg, job.name),
        "fail_once_at_step": t.fail_once_at_step.get(job.name) if t.fail_once_at_step else None,
        "progress_board": config.get("progress_board"),  # rank 0 reports steps and loss to the stage's bars
        "tracking": tracking_spec(cfg),  # rank 0 logs its curves (TensorBoard by default)
        **task.get("loop", {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=train_run_name(job, config["settings"]),
            storage_path=runs,
            storage_filesystem=arrow_filesystem(runs, cfg.data.s3),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[] if task.get("plan") else ["train"], execution_options=ingest_options(t, datasets)
        ),
    )
    fit_start = time.time()
    trainer.fit()
    fit_end = time.time()
    metrics = finalize_job(
        cfg, job, config, facts, {"trial_start": trial_start, "fit_start": fit_start, "fit_end": fit_end}, out_dir
    )
    ray.tune.report({"done": 1, "samples_seen": metrics["samples_seen"], "trial_seconds": metrics["timing"]["trial"]})


def tracking_spec(cfg: Config) -> dict[str, Any] | None:
    """What the loop's tracker needs: one experiment per run, named after the run root."""
    tr = cfg.tracking
    if not tr.report_to:
        return None
    experiment = f"mode_ray-{cfg.run_root.rstrip('/').rsplit('/', 1)[-1]}"
    return {**tr.model_dump(mode="json"), "experiment": experiment}


def ingest_options(t: Any, datasets: dict[str, Any]) -> dict[str, Any]:
    """Ray Train's ingest defaults, with the training data's object store budget capped; an MCL rank's data
    keeps its planned order (every global batch is one cluster)."""
    from ray.train import DataConfig

    options = {}
    for name in datasets:
        opts = DataConfig.default_ingest_options()
        if name.startswith("train"):
            opts.resource_limits = opts.resource_limits.copy(object_store_memory=t.data_buffer_mb * 1024 * 1024)
            opts.preserve_order = name != "train"
        options[name] = opts
    return options


def failure_marker_path(cfg: Config, job_name: str) -> str:
    """Where the fail-once test hook records that it fired (a local temp file: it only guards a test aid)."""
    return os.path.join(tempfile.gettempdir(), "mode_ray_failures", settings_hash(cfg.run_root, job_name))


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
    cfg: Config, job: Job, config: dict[str, Any], facts: dict[str, Any], trial: dict[str, float], out: str
) -> dict[str, Any]:
    """metrics.json from the worker's record and the trial's timing, then the completion marker."""
    record = read_json(join(out, TRAIN_RECORD), cfg.data.s3)
    seen = {k: int(v) for k, v in record["seen"].items()}
    metrics = {
        "job": asdict(job),
        "model": cfg.training.model,
        "steps": record["end_step"] - record["start_step"],
        "start_step": record["start_step"],
        "end_step": record["end_step"],
        "batch_size": cfg.training.batch_size,
        "samples_per_epoch": config["samples_per_epoch"],
        "samples_seen": sum(seen.values()),
        "samples_seen_by_cluster": seen,
        "executions": record["executions"],
        "first_lr": record["first_lr"],
        "skipped_images": record["skipped_images"],
        "loss_history": record["loss_history"],
        "val_history": record["val_history"],
        "recovery": record.get("recovery", []),  # unreadable checkpoints skipped on the way
        "torch_threads": config["torch_threads"],
        **facts,
    }
    metrics["timing"] = time_breakdown(record, trial, time.time())
    write_json(join(out, "metrics.json"), metrics, cfg.data.s3)
    if not config.get("task"):  # a model of the run (not a CLIP-MoE step): its export gets a model card
        write_card(cfg, job.name)
    mark_done(out, config["settings"], cfg.data.s3, **(config.get("task") or {}).get("marker", {}))
    return metrics


# --------------------------------------------------------------------------- orchestration


def _max_concurrent(cfg: Config) -> int:
    import ray

    t = cfg.training
    if t.max_concurrent_trials:
        return t.max_concurrent_trials
    resources = ray.cluster_resources()
    if t.use_gpu:
        return max(1, int(resources.get("GPU", 0) // t.num_workers))
    per_trial = t.num_workers * t.cpus_per_worker + t.data_cpus_per_trial
    return max(1, int(resources.get("CPU", 1) // per_trial))


def _torch_threads(cfg: Config, concurrent: int) -> int:
    """The configured count, or this node's CPUs shared by the trials running side by side: the seed runs
    alone and gets them all, the tails split them (a worker's fractional CPU request would give it one)."""
    import ray

    if cfg.training.torch_threads:
        return cfg.training.torch_threads
    cpus = ray.cluster_resources().get("CPU", 1) / max(1, len(ray.nodes()))
    return max(1, int(cpus // (concurrent * cfg.training.num_workers)))


def train_run_name(job: Job, settings: str) -> str:
    """Same settings, same name: a rerun resumes this Train run's checkpoints; changed settings start afresh."""
    return f"{job.name}-{settings[:10]}"


def claim_job_folders(
    cfg: Config, jobs: list[Job], settings: dict[str, str], force: bool, tasks: dict[str, dict[str, Any]] | None
) -> None:
    """Each job's output folder and Ray Train run folder, claimed before its trial writes there (so a later
    --force or rollback may delete them); under --force the Train run starts from nothing."""
    for job in jobs:
        out = (tasks or {}).get(job.name, {}).get("out_dir") or experts_dir(cfg, job.name)
        claim(out, f"model {job.name}", cfg.data.s3)
        train_run = join(cfg.run_root, "train_runs", train_run_name(job, settings[job.name]))
        if force:  # nothing to resume: --force means from the start
            remove_owned_tree(train_run, cfg.data.s3)
        claim(train_run, f"Ray Train run of {job.name}", cfg.data.s3)


def run_phase(
    cfg: Config,
    phase: str,
    jobs: list[Job],
    settings: dict[str, str],
    force: bool,
    shared: dict[str, Any],
    tasks: dict[str, dict[str, Any]] | None = None,
) -> None:
    """The jobs as parallel Tune trials of `run_job_trial`. `shared`: schedule and samples_per_epoch of every
    job; `tasks`: per job name, what a CLIP-MoE job adds (data plan, loop settings, output folder)."""
    import ray.tune as tune

    if not jobs:
        return
    tune_root = join(cfg.run_root, "tune")
    name = f"{phase}-{settings_hash(sorted(j.name for j in jobs), sorted(settings.values()))}"
    require_resources(cfg, training_needs(cfg), phase)
    claim_job_folders(cfg, jobs, settings, force, tasks)
    # The trial only drives its TorchTrainer; its workers ask for their own CPUs/GPUs.
    trainable = tune.with_resources(run_job_trial, {"CPU": 0.01})
    fs = arrow_filesystem(tune_root, cfg.data.s3)
    exp_path = join(tune_root, name)
    concurrent = min(len(jobs), _max_concurrent(cfg))
    # Never Tune's resume: its experiment state is pickled, and a run root on shared storage must not run
    # code from a file. Each job resumes from its own Train checkpoints (a JSON index and weights-only state
    # files, see mode_ray/train/loop.py); Tune's folder holds only its bookkeeping and starts afresh.
    fresh_dir(exp_path, "a Tune experiment", cfg.data.s3)
    with progress_bars(phase) as board:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "job": tune.grid_search([asdict(j) for j in jobs]),  # in plan order: the longest job first
                "cfg": cfg.model_dump(mode="json"),
                **shared,
                "task": tune.sample_from(lambda config: (tasks or {}).get(config["job"]["name"], {})),
                "torch_threads": _torch_threads(cfg, concurrent),
                "input_spec": asdict(input_spec(cfg.training.model)),
                "settings": tune.sample_from(lambda config: settings[config["job"]["name"]]),
                "embedded_ray": cluster_address(cfg) is None,  # decided here: a trial runs inside Ray
                "progress_board": board,
            },
            tune_config=tune.TuneConfig(
                max_concurrent_trials=concurrent,
                trial_name_creator=lambda trial: trial.config["job"]["name"],
                trial_dirname_creator=lambda trial: trial.config["job"]["name"],
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=tune_root,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.training.max_failures),
                verbose=1 if verbose() else 0,  # Tune's result tables were most of the console
            ),
        )
        grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} training trial(s) failed: " + "; ".join(str(r.error)[:300] for r in failed))


def plan_shared(plan: Plan, init_export: str | None = None) -> dict[str, Any]:
    return {"schedule": asdict(plan.schedule), "samples_per_epoch": plan.samples_per_epoch, "init_export": init_export}


def resolve_init(cfg: Config) -> str | None:
    """training.init as a weights folder, its architecture checked against training.model (before any trial)."""
    if not cfg.training.init:
        return None
    folder = resolve_pretrained(cfg.training.init, cfg.run_root, cfg.data.s3)
    check_architecture(folder, cfg.training.model, "training.init", cfg.data.s3)
    return folder


def run_train(cfg: Config, force: bool = False) -> dict[str, Any]:
    """Seed, then every data expert and both generalists as parallel trials; skips finished models."""
    from mode_ray.runtime import ray_runtime

    paths = RunPaths(cfg.run_root)
    claim_run_root(cfg.run_root, cfg.data.s3)
    if not exists(paths.prep_summary, cfg.data.s3):
        raise ValueError(f"no prep output under {cfg.run_root}: run `mode-ray prep` first")
    prep = read_json(paths.prep_summary, cfg.data.s3)
    per_expert = prep["per_expert"]
    manifest_run = prep.get("manifest_run_id", "")
    plan = make_plan(cfg, per_expert)
    seed = plan.seed
    for e in plan.empty_experts:
        console.print(f"[yellow]expert-{e}: empty partition, skipped[/yellow]")
    jobs = ([seed] if seed else []) + plan.tails
    settings = {j.name: job_hash(cfg, plan, j, manifest_run) for j in jobs}
    if seed is not None:  # the tails continue this very seed: a new seed means new tails
        settings = {n: s if n == SEED else settings_hash(s, settings[SEED]) for n, s in settings.items()}

    def pending(todo: list[Job]) -> list[Job]:
        return [j for j in todo if force or not model_done(cfg, j.name, settings[j.name])]

    console.print(
        f"  schedule: {plan.schedule.total_steps} steps of {plan.batch_size} "
        f"({plan.samples_per_epoch} samples an epoch); seed {seed.steps if seed else 0} steps, "
        + ", ".join(f"{j.name} {j.steps}" for j in plan.tails)
    )
    init = resolve_init(cfg) if pending(jobs) else None
    with ray_runtime(cfg):
        if pending(jobs):  # before decoding anything: a trial this Ray can never place fails now
            require_resources(cfg, training_needs(cfg), "train")
        if cfg.training.decode_cache:
            with stage_log("train: decoded inputs") as log:
                built = build_input_cache(cfg, manifest_run, force)
                build_generation_caches(cfg)  # rows `mode-ray add-data` added train too
                if built:
                    log.done(f"every image decoded once into {input_cache_dir(cfg)}")
                else:
                    log.skip("train_inputs/ complete")
        with stage_log("train: seed") as log:
            todo = pending([seed]) if seed else []
            if seed is None:
                log.skip("training.use_seed is off: experts train from scratch")
            elif not todo:
                log.skip("experts/seed complete")
            else:
                run_phase(cfg, "seed", todo, settings, force, plan_shared(plan, init))
                log.done(f"steps [0, {seed.end_step})")
        with stage_log("train: experts + generalists") as log:
            todo = pending(plan.tails)
            if not todo:
                log.skip("all models complete")
            else:
                run_phase(cfg, "tails", todo, settings, force, plan_shared(plan, init))
                log.done(f"{len(todo)} models")
    summary = training_summary(cfg, plan)
    write_json(RunPaths(cfg.run_root).experts_summary, summary, cfg.data.s3)
    print_training_summary(summary)
    return summary


def model_compute(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Training compute behind each model and the ensemble: its own samples and seconds plus the seed's
    when it continues the seed (the ensemble pays for the seed once and every expert). `train_seconds` is
    time spent learning (forward, backward, step); `trial_seconds` adds every fixed cost."""

    def cost(names: list[str]) -> dict[str, float]:
        return {
            "samples": sum(models[n]["samples_seen"] for n in names),
            "train_seconds": sum(models[n]["timing"]["compute"] for n in names),
            "trial_seconds": sum(models[n]["timing"]["trial"] for n in names),
        }

    seed = [SEED] if SEED in models else []
    out = {}
    for name, m in models.items():
        out[name] = cost((seed if m["job"]["init_from_seed"] else []) + [name])
    experts = [n for n in models if models[n]["job"]["expert"] is not None]
    if experts:
        out["ensemble"] = cost(seed + experts)
    return out


def training_summary(cfg: Config, plan: Plan) -> dict[str, Any]:
    from mode_ray.registry import read_registry

    jobs = ([plan.seed] if plan.seed else []) + plan.tails
    models = {j.name: read_json(join(experts_dir(cfg, j.name), "metrics.json"), cfg.data.s3) for j in jobs}
    for name, entry in read_registry(cfg)["experts"].items():  # experts `mode-ray add-data` trained stay listed
        if entry.get("generation") and name not in models:
            models[name] = read_json(join(experts_dir(cfg, name), "metrics.json"), cfg.data.s3)
    return {
        "models": models,
        "schedule": asdict(plan.schedule),
        "samples_per_epoch": plan.samples_per_epoch,
        "batch_size": plan.batch_size,
        "empty_experts_skipped": plan.empty_experts,
        "compute": model_compute(models),
    }


def _val_loss(m: dict[str, Any]) -> str:
    """Held-out loss at the end: on the expert's own partition for an expert, on everything otherwise."""
    if not m["val_history"]:
        return "-"
    last = m["val_history"][-1]
    expert = m["job"]["expert"]
    group = last["by_cluster"].get(str(expert)) if expert is not None else last["all"]
    return f"{group['loss']:.3f}" if group and group.get("loss") is not None else "-"


def print_training_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="trained models")
    for col in ("model", "steps", "samples", "loss first → last", "held-out loss", "trial s", "learning s", "fixed s"):
        table.add_column(col)
    for name, m in summary["models"].items():
        losses = [p["loss"] for p in m["loss_history"]]
        timing = m["timing"]
        table.add_row(
            name,
            f"{m['start_step']}→{m['end_step']}",
            str(m["samples_seen"]),
            f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "-",
            _val_loss(m),
            f"{timing['trial']:.1f}",
            f"{timing['compute']:.1f}",
            f"{timing['fixed']:.1f}",
        )
    console.print(table)
    for name, m in summary["models"].items():
        for note in m.get("recovery", []):
            console.print(f"[yellow]{name}: {note}[/yellow]")
    if verbose():  # also in each model's metrics.json ("timing")
        breakdown = Table(title="where each trial's fixed seconds went")
        parts = [k for k in next(iter(summary["models"].values()))["timing"] if k not in ("trial", "fixed", "compute")]
        for col in ("model", *parts):
            breakdown.add_column(col.replace("_", " "))
        for name, m in summary["models"].items():
            breakdown.add_row(name, *(f"{m['timing'][p]:.1f}" for p in parts))
        console.print(breakdown)
    c = summary["compute"]
    line = ", ".join(f"{n} {v['samples']:,} samples / {v['train_seconds']:.0f} s" for n, v in c.items())
    console.print(f"training compute (seed included where continued): {line}")
