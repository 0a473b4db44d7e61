"""The `mode-ray` command line: each command loads the config and calls one stage function."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from mode_ray.config import Config, ConfigError, load_config
from mode_ray.console.progress import VERBOSE_ENV, console

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: dotted.key=value (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo stages even when their outputs are complete.")]


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show Ray's and the workers' own output live.")
    ] = False,
) -> None:
    """mode_ray: CLIP data experts (MoDE) and CLIP mixtures of experts on Ray."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    from mode_ray.ray_env.runtime import quiet_at_the_source

    quiet_at_the_source()  # before any stage imports Ray Data, Ray Train or transformers


def _fail(err: Exception, code: int) -> typer.Exit:
    from mode_ray.ray_env.runtime import log_hint

    console.print(f"[red]{escape(str(err))}[/red]{log_hint()}")
    return typer.Exit(code)


def _load(config: Path, overrides: list[str] | None) -> Config:
    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        console.print(f"[red]{escape(str(err))}[/red]")
        raise typer.Exit(2) from None


@app.command()
def run(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    only: Annotated[list[str] | None, typer.Option(help="Run only these stages (repeatable).")] = None,
) -> None:
    """Run the whole pipeline, skipping stages whose outputs are complete."""
    from mode_ray.pipeline import run_all

    cfg = _load(config, set_)
    try:
        run_all(cfg, force=force, only=only)
    except ValueError as err:
        raise _fail(err, 2) from None
    except RuntimeError as err:  # a failed trial or stage: its reason, where the full logs are
        raise _fail(err, 1) from None


@app.command()
def prep(config: ConfigOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """MoDE data prep: embed captions, two-step clustering, assignment → manifest/, rejects/, centroids."""
    from mode_ray.stages.prep import run_prep

    _run_stage(run_prep, _load(config, set_), force)


@app.command()
def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    model: Annotated[
        list[str] | None, typer.Option(help="Train only this model and those it continues (repeatable).")
    ] = None,
) -> None:
    """Train the seed, one data expert per coarse cluster and the generalist, as parallel Ray Train trials."""
    from functools import partial

    from mode_ray.stages.train import run_train

    _run_stage(partial(run_train, models=model), _load(config, set_), force)


@app.command()
def moe(config: ConfigOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Build a CLIP-MoE from a trained dense CLIP: MCL stages, upcycling, router fine-tuning (moe/)."""
    from mode_ray.stages.moe import run_moe

    _run_stage(run_moe, _load(config, set_), force)


@app.command("add-data")
def add_data(
    config: ConfigOpt,
    shards: Annotated[str, typer.Option(help="The new webdataset shards (directory, glob or URL).")],
    name: Annotated[str | None, typer.Option(help="The new data's generation name (default: from the URL).")] = None,
    refresh_experts: Annotated[
        bool,
        typer.Option(
            "--refresh-experts",
            help="Also retrain the existing experts whose partitions the new data grew (previous versions kept).",
        ),
    ] = False,
    set_: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Grow a trained run: prep the new shards, new experts for what its clusters do not cover, trained alone."""
    from mode_ray.stages.grow import run_add_data

    extra = [f"continual.shards={shards}"] + ([f"continual.name={name}"] if name else [])
    extra += ["continual.refresh_experts=true"] if refresh_experts else []
    _run_stage(run_add_data, _load(config, [*(set_ or []), *extra]), force)


experts_app = typer.Typer(no_args_is_help=True, help="The run's data experts in service.")
app.add_typer(experts_app, name="experts")


@experts_app.command("list")
def experts_list(config: ConfigOpt, set_: SetOpt = None) -> None:
    """Every trained model, whether it is in service, and when an added expert came."""
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.registry import read_registry
    from mode_ray.run_root.storage import read_json

    cfg = _load(config, set_)
    models = read_json(RunPaths(cfg.run_root).experts_summary, cfg.data.s3)["models"]
    registry = read_registry(cfg)["experts"]
    for name in models:
        entry = registry.get(name, {})
        state = "in service" if entry.get("active", True) else "removed"
        added = f", added {entry['added']} from {entry['generation']}" if entry.get("added") else ""
        refreshes = entry.get("refreshes") or []
        refreshed = "".join(f", refreshed {r['at']} with {r['generation']}" for r in refreshes)
        console.print(f"{name}: {state}{added}{refreshed}")


def _set_active(config: Path, name: str, set_: list[str] | None, active: bool) -> None:
    from mode_ray.run_root.layout import RunPaths
    from mode_ray.run_root.registry import set_active
    from mode_ray.run_root.storage import read_json

    cfg = _load(config, set_)
    models = list(read_json(RunPaths(cfg.run_root).experts_summary, cfg.data.s3)["models"])
    try:
        set_active(cfg, name, active, models)
    except ValueError as err:
        raise _fail(err, 2) from None
    console.print(f"{name}: {'back in service' if active else 'out of routing, evaluation and serving (files kept)'}")


@experts_app.command("remove")
def experts_remove(config: ConfigOpt, name: str, set_: SetOpt = None) -> None:
    """Take a data expert out of routing, evaluation and serving; its files stay."""
    _set_active(config, name, set_, False)


@experts_app.command("restore")
def experts_restore(config: ConfigOpt, name: str, set_: SetOpt = None) -> None:
    """Put a removed data expert back in service."""
    _set_active(config, name, set_, True)


@experts_app.command("rollback")
def experts_rollback(config: ConfigOpt, name: str, set_: SetOpt = None) -> None:
    """Put back a data expert's version from before its last refresh (add-data --refresh-experts)."""
    from mode_ray.stages.grow import rollback_expert

    cfg = _load(config, set_)
    try:
        previous = rollback_expert(cfg, name)
    except ValueError as err:
        raise _fail(err, 2) from None
    console.print(f"{name}: back to its version from {previous}")


@app.command("eval")
def evaluate(config: ConfigOpt, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Zero-shot tasks and retrieval for every model, the routed ensembles and controls → eval/report.*"""
    from mode_ray.stages.evaluate import run_eval

    _run_stage(run_eval, _load(config, set_), force)


@app.command("serve")
def serve_cmd(
    config: ConfigOpt,
    set_: SetOpt = None,
    keep: Annotated[bool, typer.Option("--keep/--no-keep", help="Keep serving after the self-check.")] = True,
) -> None:
    """Deploy the Ray Serve zero-shot endpoint from the run root, self-check it over HTTP, and serve."""
    from mode_ray.stages.serve import run_serve

    cfg = _load(config, set_)
    _run_stage(lambda c, _: run_serve(c, keep_running=keep), cfg, False)


def _run_stage(fn, cfg: Config, force: bool) -> None:
    try:
        fn(cfg, force)
    except ValueError as err:
        raise _fail(err, 2) from None
    except RuntimeError as err:
        raise _fail(err, 1) from None


@app.command("demo-data")
def demo_data_cmd(
    out: Annotated[str, typer.Option(help="Output directory (local path or fsspec URL).")],
    samples: Annotated[int, typer.Option(min=1)] = 2000,
    shards: Annotated[int, typer.Option(min=1)] = 8,
    seed: int = 0,
    split: Annotated[str, typer.Option(help="train or eval")] = "train",
    faults: Annotated[bool, typer.Option(help="Add damaged samples and a truncated shard.")] = False,
    max_pixels: Annotated[int, typer.Option(help="Pixel limit the oversized fault image exceeds.")] = 4_000_000,
    difficulty: Annotated[str, typer.Option(help="standard or hard (fine-grained classes in clutter)")] = "standard",
) -> None:
    """Write the multi-domain demo dataset as webdataset shards in the MoDE layout."""
    from mode_ray.demo import demo_data

    try:
        record = demo_data.generate(out, samples, shards, seed, split, faults, max_pixels, difficulty=difficulty)
    except ValueError as err:
        console.print(f"[red]{escape(str(err))}[/red]")
        raise typer.Exit(2) from None
    console.print(
        f"wrote {record['samples']} samples in {len(record['shards'])} shards to {out} "
        f"(domains: {record['domains']}, faults: {len(record['faults'])})"
    )


if __name__ == "__main__":
    app()
