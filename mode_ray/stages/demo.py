"""Stage 0 of the demo pipeline: generate the demo shards when the config asks for them."""

from __future__ import annotations

from mode_ray import demo_data
from mode_ray.config import Config
from mode_ray.progress import stage_log
from mode_ray.storage import clear_marker, mark_done, stage_done


def demo_targets(cfg: Config) -> list[tuple[str, str, int, int]]:
    """(out URL, split, samples, shards) for each split the config wants generated."""
    demo = cfg.data.demo
    if demo is None:
        return []
    for name, value in (("data.shards", cfg.data.shards), ("eval.shards", cfg.eval.shards)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name} must be a single directory URL when data.demo generates it")
    targets = [(str(cfg.data.shards), "train", demo.samples, demo.shards)]
    if cfg.eval.shards:
        targets.append((str(cfg.eval.shards), "eval", demo.eval_samples, demo.eval_shards))
    return targets


def run_demo_data(cfg: Config, force: bool = False) -> list[dict]:
    """Write the demo train/eval shards unless shards of the same settings are already there."""
    records = []
    for out, split, samples, shards in demo_targets(cfg):
        demo = cfg.data.demo
        assert demo is not None
        settings = (
            f"{demo_data.GENERATOR_VERSION}/{split}/{samples}/{shards}/{demo.seed}/{demo.faults}/"
            f"{cfg.data.max_image_pixels}" + (f"/{'+'.join(demo.domains)}" if demo.domains and split == "train" else "")
        )
        with stage_log(f"demo-data ({split})") as log:
            if not force and stage_done(out, settings, cfg.data.s3):
                log.skip(f"{out} is complete")
                continue
            clear_marker(out, cfg.data.s3)
            record = demo_data.generate(
                out,
                samples=samples,
                shards=shards,
                seed=demo.seed,
                split=split,
                faults=demo.faults and split == "train",
                max_image_pixels=cfg.data.max_image_pixels,
                s3=cfg.data.s3,
                domains=demo.domains if split == "train" else None,
            )
            mark_done(out, settings, cfg.data.s3, samples=record["samples"])
            log.done(f"{record['samples']} samples in {len(record['shards'])} shards at {out}")
            records.append(record)
    return records
