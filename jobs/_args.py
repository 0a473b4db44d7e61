"""The one argument parser every job entry point shares: --config, repeatable --set, --force."""

from __future__ import annotations

import argparse

from mode_ray.config import Config, load_config


def parse(description: str) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file (path inside the job's working dir)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="dotted.key=value")
    parser.add_argument("--force", action="store_true", help="redo stages even when complete")
    args = parser.parse_args()
    return load_config(args.config, args.overrides), args.force
