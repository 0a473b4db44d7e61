"""What every training command reads first: the prep summary (the run root claimed), and the decoded inputs
(`training.decode_cache`), the run's and those of the generations `add-data` added."""

from __future__ import annotations

from typing import Any

from mode_ray.config import Config
from mode_ray.console.progress import stage_log
from mode_ray.data.train_data import build_generation_caches, build_input_cache, input_cache_dir
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.ownership import claim_run_root
from mode_ray.run_root.storage import exists, read_json


def read_prep(cfg: Config) -> dict[str, Any]:
    paths = RunPaths(cfg.run_root)
    claim_run_root(cfg.run_root, cfg.data.s3)
    if not exists(paths.prep_summary, cfg.data.s3):
        raise ValueError(f"no prep output under {cfg.run_root}: run `mode-ray prep` first")
    return read_json(paths.prep_summary, cfg.data.s3)


def decoded_inputs(cfg: Config, manifest_run: str, force: bool) -> None:
    """Every image decoded once into train_inputs/ (training.decode_cache), the run's and its generations'."""
    if not cfg.training.decode_cache:
        return
    with stage_log("train: decoded inputs") as log:
        built = build_input_cache(cfg, manifest_run, force)
        build_generation_caches(cfg)  # rows `mode-ray add-data` added train too
        if built:
            log.done(f"every image decoded once into {input_cache_dir(cfg)}")
        else:
            log.skip("train_inputs/ complete")
