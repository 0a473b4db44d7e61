"""CLIP-MoE (docs/moe.md): MCL stages, upcycling and router fine-tuning, planned as typed jobs and run by the
DAG runner (`mode_ray.runner.dag`) — in `mode-ray run` beside the data experts' tails, as soon as the base
is trained.

    base (a dense CLIP: the run's generalist by default, or any stock-open_clip export)
    for s in 1..N-1:  embed every training pair with stage s-1's model, cluster each modality, accumulate
                      labels, plan cluster-homogeneous global batches (`mode_ray.data.mcl_plan`)
                      → only the MLPs train, from the base, fixed temperature                      = moe/stage-s
    upcycle: every block's MLP → a top-k MoE of the N stage MLPs (stage 0 = the base's)
    router fine-tuning: only the routers train, CLIP + load-balancing loss                          = moe/router
    → moe/model (state dict + JSON config; `mode_ray.models.load_model`) and moe/summary.json

Stages are sequential by the method (stage s clusters with stage s-1's model). Every job runs through the same
trial and loop as the data experts, so it is resumable the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mode_ray.config import Config
from mode_ray.console.progress import console
from mode_ray.data.mcl_plan import stage_name
from mode_ray.models.card import write_card
from mode_ray.models.clip import export_info
from mode_ray.models.pretrained import is_identifier, resolve_pretrained
from mode_ray.run_root.compute import moe_compute
from mode_ray.run_root.layout import MOE, RunPaths
from mode_ray.run_root.storage import exists, join, marker_info, read_bytes, read_json, write_json
from mode_ray.runner.plan_jobs import ROUTER, MoEBase, inputs_of, moe_jobs, samples_per_epoch
from mode_ray.train.inputs import input_spec
from mode_ray.train.job import Inputs, TrainJob


@dataclass
class Branch:
    """The MoE's jobs and what they start from: the base, and its settings hash when it is complete already."""

    base: MoEBase
    jobs: list[TrainJob]
    known: dict[str, str] = field(default_factory=dict)


def resolve_base(cfg: Config, planned: set[str]) -> tuple[MoEBase, dict[str, str]]:
    """`moe.base` as a parent job (a model of this run: planned beside it, or complete) or an export from
    elsewhere (checked now); with the settings hash of a complete base outside the plan."""
    paths, s3, base = RunPaths(cfg.run_root), cfg.data.s3, cfg.moe.base
    if not is_identifier(base):  # a model of this run
        if base in planned:
            return MoEBase(paths.export(base), job=base), {}
        if not exists(join(paths.experts(base), "_SUCCESS"), s3):
            raise ValueError(
                f"moe.base is {base!r}, but {paths.experts(base)} holds no finished model: run `mode-ray train` "
                "first, or set moe.base to a trained model of this run or to an open_clip export folder"
            )
        return MoEBase(paths.export(base), job=base), {base: marker_info(paths.experts(base), s3)["config_hash"]}
    folder = resolve_pretrained(base, cfg.run_root, s3)  # local-dir:, hf-hub:, ARCH:TAG|FILE or a folder
    try:
        _, config = export_info(folder, s3)
    except FileNotFoundError as err:
        raise ValueError(f"moe.base {base!r} is not an open_clip export folder: {err}") from None
    if config["vision_cfg"]["image_size"] != input_spec(cfg.training.model).size:
        raise ValueError(
            f"moe.base's image size differs from training.model {cfg.training.model!r}, whose inputs the run decoded"
        )
    return MoEBase(folder, identity=base), {}


def plan_branch(cfg: Config, inputs: Inputs, spe: int, planned: set[str]) -> Branch | None:
    """The MoE's jobs (None when `moe.enabled` is off)."""
    if not cfg.moe.enabled:
        console.print("[yellow]↷ moe[/yellow] skipped: moe.enabled is false")
        return None
    base, known = resolve_base(cfg, planned)
    return Branch(base, moe_jobs(cfg, base, inputs, spe), known)


def run_moe(cfg: Config, force: bool = False) -> dict[str, Any]:
    """`mode-ray moe`: MCL stages 1..N-1, then router fine-tuning of the upcycled MoE, from a base that is
    complete already; skips whatever is complete."""
    from mode_ray.data.run_inputs import decoded_inputs, read_prep
    from mode_ray.ray_env.runtime import ray_runtime
    from mode_ray.runner.dag import train_stage

    prep = read_prep(cfg)
    manifest_run = prep.get("manifest_run_id", "")
    spe = samples_per_epoch(cfg, prep["in_manifest"])
    base, known = resolve_base(cfg, set())
    branch = Branch(base, moe_jobs(cfg, base, inputs_of(cfg, manifest_run), spe), known)
    with ray_runtime(cfg):
        decoded_inputs(cfg, manifest_run, force)
        what = f"jobs: {cfg.moe.stages} experts a layer, top-{cfg.moe.top_k}"
        train_stage(cfg, "moe", branch.jobs, spe, force, what, "moe/ complete", branch.known)
    return finish(cfg, branch)


def run_moe_if_enabled(cfg: Config, force: bool = False) -> dict[str, Any] | None:
    """`mode-ray run --only moe`'s CLIP-MoE stage: `moe.enabled: false` leaves it out."""
    if not cfg.moe.enabled:
        console.print("[yellow]↷ moe[/yellow] skipped: moe.enabled is false")
        return None
    return run_moe(cfg, force)


def finish(cfg: Config, branch: Branch) -> dict[str, Any]:
    """moe/summary.json and the MoE's card, from every job's record."""
    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    *mcl, router = branch.jobs
    stages = [{**read_json(join(j.paths.out_dir, "plan.json"), s3), **_metrics(j.paths.out_dir, cfg)} for j in mcl]
    base_compute = {}
    if branch.base.job and exists(paths.experts_summary, s3):
        base_compute = read_json(paths.experts_summary, s3)["compute"].get(branch.base.job, {})
    summary = moe_summary(cfg, branch.base.url, base_compute, stages, _metrics(router.paths.out_dir, cfg))
    write_json(paths.moe_summary, summary, s3)
    write_card(cfg, MOE)
    print_moe_summary(summary)
    return summary


def _metrics(out: str, cfg: Config) -> dict[str, Any]:
    m = read_json(join(out, "metrics.json"), cfg.data.s3)
    losses = [p["loss"] for p in m["loss_history"]]
    return {
        "steps": m["steps"],
        "samples_seen": m["samples_seen"],
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "val_history": m["val_history"],
        "timing": m["timing"],
    }


def moe_summary(
    cfg: Config, base_url: str, base_compute: dict[str, Any], stages: list[dict[str, Any]], router: dict[str, Any]
) -> dict[str, Any]:
    """What was built and what it cost: the base's own training compute plus every MCL stage and the router."""
    parts = {stage_name(s["stage"]): s for s in stages} | {ROUTER: router}
    spec = json.loads(read_bytes(join(RunPaths(cfg.run_root).export(MOE), "moe_config.json"), cfg.data.s3))
    spec.pop("open_clip_config", None)
    return {
        "base": cfg.moe.base,
        "base_export": base_url,
        "spec": spec,
        "stages": stages,
        "router": router,
        "compute": moe_compute(base_compute, parts),
    }


def print_moe_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"CLIP-MoE from {summary['base']}")
    for col in ("job", "steps", "samples", "loss first → last", "held-out loss", "trial s", "learning s"):
        table.add_column(col)
    for name, part in [*((stage_name(s["stage"]), s) for s in summary["stages"]), (ROUTER, summary["router"])]:
        val = part["val_history"][-1]["all"]["loss"] if part["val_history"] else None
        table.add_row(
            name,
            str(part["steps"]),
            str(part["samples_seen"]),
            f"{part['loss_first']:.3f} → {part['loss_last']:.3f}" if part["loss_first"] is not None else "-",
            f"{val:.3f}" if val is not None else "-",
            f"{part['timing']['trial']:.1f}",
            f"{part['timing']['compute']:.1f}",
        )
    console.print(table)
    c = summary["compute"]
    console.print(f"MoE compute: {c['samples']:,} samples (base included), {c['moe_samples']:,} of them for the MoE")
