"""`mode-ray run`: every stage in order; each skips itself when its outputs are complete."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

from mode_ray.config import Config, dump_config
from mode_ray.console.progress import console
from mode_ray.ray_env.runtime import ray_runtime
from mode_ray.run_root.ownership import claim_run_root
from mode_ray.run_root.storage import exists, join, write_bytes
from mode_ray.stages.demo import check_demo_locations, run_demo_data
from mode_ray.stages.evaluate import check_eval_inputs, run_eval
from mode_ray.stages.moe import run_moe_if_enabled
from mode_ray.stages.prep import run_prep
from mode_ray.stages.serve import run_serve
from mode_ray.stages.train import run_train

StageFn = Callable[[Config, bool], object]

# In flow order; each stage function takes (config, force).
STAGES: list[tuple[str, StageFn]] = [
    ("demo-data", run_demo_data),
    ("prep", run_prep),
    ("train", run_train),
    ("moe", run_moe_if_enabled),
    ("eval", run_eval),
    ("serve", run_serve),
]


RAY_FREE = {"demo-data"}


def save_resolved_config(cfg: Config) -> str:
    """Keep the resolved config with the run, so a run root says how it was made."""
    url = join(cfg.run_root, "config.yaml")
    write_bytes(url, dump_config(cfg).encode(), cfg.data.s3)
    return url


def run_all(cfg: Config, force: bool = False, only: list[str] | None = None) -> None:
    names = [name for name, _ in STAGES]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {names}")
    selected = [(name, fn) for name, fn in STAGES if not only or name in only]
    if any(name == "demo-data" for name, _ in selected):
        check_demo_locations(cfg)  # before anything is written, the run's config included
    if any(name == "eval" for name, _ in selected):
        check_eval_inputs(cfg)
    claim_run_root(cfg.run_root, cfg.data.s3)
    console.print(f"run root: {save_resolved_config(cfg)}")
    needs_ray = any(name not in RAY_FREE for name, _ in selected)
    # One Ray for every stage (each would otherwise start and stop its own); none for demo data alone.
    with ray_runtime(cfg) if needs_ray else nullcontext():
        for name, fn in selected:
            if name == "train" and any(n == "moe" for n, _ in selected):
                run_train(cfg, force, with_moe=True)  # one DAG: the MoE trains beside the experts' tails
            elif name != "moe" or not any(n == "train" for n, _ in selected):
                fn(cfg, force)
    print_closing_summary(cfg)


def print_closing_summary(cfg: Config) -> None:
    """Time per stage, and where the report and the logs are."""
    from mode_ray.console.progress import STAGE_SECONDS
    from mode_ray.ray_env.runtime import LOG_DIR
    from mode_ray.run_root.layout import RunPaths

    total = sum(STAGE_SECONDS.values())
    parts = ", ".join(f"{name} {s:.0f}s" if s else f"{name} (already complete)" for name, s in STAGE_SECONDS.items())
    console.print(f"[bold]done[/bold] in {total:.0f}s of stages: {parts}")
    report = join(RunPaths(cfg.run_root).eval, "report.md")
    where = [f"report: {report}"] if exists(report, cfg.data.s3) else []
    where += [f"Ray's logs: {LOG_DIR[0]}"] if LOG_DIR else []
    if "tensorboard" in cfg.tracking.report_to and exists(cfg.tracking.dir, cfg.data.s3):
        where.append(f"training curves: tensorboard --logdir {cfg.tracking.dir}")
    if where:
        console.print("   ".join(where))
