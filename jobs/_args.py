"""What every job entry point shares: --config, repeatable --set, --force, and how a job ends.

A job joins the cluster it was submitted to (Ray sets RAY_ADDRESS for the driver; `mode_ray.ray_env.runtime`), logs
its stages to the job log, and on failure exits non-zero with a one-line reason as the log's last line (the
traceback above it), so `ray job status` / `ray job logs` say why.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from typing import Any

from mode_ray.config import Config, ConfigError, load_config


def parse(description: str, stages: list[str] | None = None) -> tuple[Config, bool, list[str] | None]:
    """(the config, --force, the --only stages: None for all); `stages`: the names --only may take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (path inside the job's working dir)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--force", action="store_true", help="redo stages even when complete")
    if stages:
        parser.add_argument("--only", action="append", choices=stages, help="run only this stage (repeatable)")
    args = parser.parse_args()
    try:
        return load_config(args.config, args.overrides), args.force, getattr(args, "only", None)
    except (ConfigError, OSError) as err:
        print(f"job failed: bad config: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def run_job(description: str, stage: Callable[..., Any], stages: list[str] | None = None) -> None:
    """Parse the arguments, run one stage function (or the pipeline, whose `stages` --only may pick) on the
    cluster, end with a clear reason."""
    from mode_ray.ray_env.runtime import quiet_at_the_source, ray_runtime

    quiet_at_the_source()
    cfg, force, only = parse(description, stages)
    try:
        with ray_runtime(cfg):
            stage(cfg, force, **({"only": only} if only else {}))
    except Exception as err:  # noqa: BLE001 — any failure ends the job with its reason on one line
        traceback.print_exc()
        reason = " ".join(str(err).split()) or type(err).__name__
        print(f"job failed: {type(err).__name__}: {reason[:500]}", file=sys.stderr)
        raise SystemExit(1) from None
