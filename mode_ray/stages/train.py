"""`mode-ray train`: the seed, then every data expert and both generalists continuing it — and, in `mode-ray
run`, the CLIP-MoE's jobs beside them — planned as typed jobs (`mode_ray.runner.plan_jobs`) and run as one DAG
(`mode_ray.runner.dag`):

    seed                all of the manifest, steps [0, S)
    expert-e            partition e + an `ooc_ratio` share of the others, steps [S, S + T), from the seed
    generalist          all of the manifest, steps [S, S + T), from the seed: the dense baseline
    generalist-matched  all of the manifest, steps [S, S + n·T), from the seed: as much compute as the whole
                        ensemble (seed + n tails) — the control a sceptic asks for first

Every model counts its schedule in samples of one global batch (`mode_ray.train.schedule`). A job whose
`experts/NAME/_SUCCESS` matches its settings is never retrained; an unfinished one resumes from its own
latest checkpoint. Adding an expert trains only it (and the matched control, whose budget grows with it).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from mode_ray.config import Config
from mode_ray.console.progress import console, verbose
from mode_ray.data.run_inputs import decoded_inputs, read_prep
from mode_ray.models.pretrained import check_architecture, resolve_pretrained
from mode_ray.ray_env.resources import training_needs
from mode_ray.ray_env.runtime import require_resources
from mode_ray.run_root.compute import model_compute
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.storage import join, read_json, write_json
from mode_ray.runner.dag import pending_jobs, train_stage
from mode_ray.runner.plan_jobs import inputs_of, make_plan, training_jobs
from mode_ray.train.job import TrainJob
from mode_ray.train.schedule import Plan


def experts_dir(cfg: Config, name: str = "") -> str:
    return RunPaths(cfg.run_root).experts(name)


def resolve_init(cfg: Config) -> str | None:
    """training.init as a weights folder, its architecture checked against training.model (before any trial)."""
    if not cfg.training.init:
        return None
    folder = resolve_pretrained(cfg.training.init, cfg.run_root, cfg.data.s3)
    check_architecture(folder, cfg.training.model, "training.init", cfg.data.s3)
    return folder


def run_train(
    cfg: Config, force: bool = False, with_moe: bool = False, models: list[str] | None = None
) -> dict[str, Any]:
    """Seed, every data expert and both generalists (and, `with_moe`, the CLIP-MoE's jobs) as one DAG of
    Ray Train trials; skips finished models. `models`: only these and the models they continue (a dense
    baseline alone: seed and generalist)."""
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.stages import moe

    prep = read_prep(cfg)
    manifest_run = prep.get("manifest_run_id", "")
    plan = make_plan(cfg, prep["per_expert"])
    inputs = inputs_of(cfg, manifest_run)
    jobs = training_jobs(cfg, plan, inputs, resolve_init(cfg))
    if models:
        jobs = with_ancestors(jobs, models)
    for e in plan.empty_experts:
        console.print(f"[yellow]expert-{e}: empty partition, skipped[/yellow]")
    print_schedule(plan)
    branch = moe.plan_branch(cfg, inputs, plan.samples_per_epoch, {j.name for j in jobs}) if with_moe else None
    every = jobs + (branch.jobs if branch else [])
    with ray_runtime(cfg):
        if pending_jobs(cfg, every, force, branch.known if branch else None)[1]:  # before decoding anything:
            require_resources(cfg, training_needs(cfg), "train")  # a trial this Ray can never place fails now
        decoded_inputs(cfg, manifest_run, force)
        title, known = ("train + moe", branch.known) if branch else ("train", None)
        train_stage(cfg, title, every, plan.samples_per_epoch, force, "jobs", "all models complete", known)
    summary = training_summary(cfg, plan, jobs)
    write_json(RunPaths(cfg.run_root).experts_summary, summary, cfg.data.s3)
    print_training_summary(summary)
    if branch:
        moe.finish(cfg, branch)
    return summary


def print_schedule(plan: Plan) -> None:
    seed = plan.seed
    console.print(
        f"  schedule: {plan.schedule.total_steps} steps of {plan.batch_size} "
        f"({plan.samples_per_epoch} samples an epoch); seed {seed.steps if seed else 0} steps, "
        + ", ".join(f"{j.name} {j.steps}" for j in plan.tails)
    )


def with_ancestors(jobs: list[TrainJob], names: list[str]) -> list[TrainJob]:
    """The jobs named and every job they continue, in plan order; an unknown name is an error."""
    by_name = {j.name: j for j in jobs}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise ValueError(f"no model {unknown} in this run's plan; it has {list(by_name)}")
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += [p for p in by_name[name].parents if p in by_name]
    return [j for j in jobs if j.name in wanted]


def training_summary(cfg: Config, plan: Plan, jobs: list[TrainJob]) -> dict[str, Any]:
    from mode_ray.run_root.registry import read_registry

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
