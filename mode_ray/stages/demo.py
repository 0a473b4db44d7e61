"""Stage 0 of the demo pipeline: generate the demo shards when the config asks for them.

The demo writes only where nothing else lives. `data.shards` and `eval.shards` name where the demo data goes
when `data.demo` is set; pointed at a user's own shards (a `--set data.shards=…` on the demo config), that
would overwrite them and train on the mixture. So every location is checked before anything is written:
it must be one folder (not a glob, brace pattern or list), apart from the run root's stage folders and from
the other split's, and new, empty or made by the generator. Anything else is refused with the ways out.
Generation is never switched off behind the user's back: the rest of a demo config (its tasks, budgets)
assumes demo data, so a silent switch would train on one dataset and evaluate on another.
"""

from __future__ import annotations

from dataclasses import dataclass

from mode_ray.config import Config
from mode_ray.console.progress import stage_log
from mode_ray.demo import demo_data
from mode_ray.run_root.layout import STAGE_FOLDERS
from mode_ray.run_root.ownership import claim_run_root, entries, listing
from mode_ray.run_root.storage import mark_done, stage_done


@dataclass(frozen=True)
class DemoTarget:
    setting: str  # the config key that names the location
    out: str
    split: str
    samples: int
    shards: int


def _within(inner: str, outer: str) -> bool:
    return inner.rstrip("/") == outer.rstrip("/") or inner.startswith(outer.rstrip("/") + "/")


def _why_not(cfg: Config, where: object) -> str | None:
    """Why `where` cannot take generated demo data, by its name alone (None: it can)."""
    if not isinstance(where, str):
        return "is a list of shards"
    if any(ch in where for ch in "*?["):
        return "is a glob pattern"
    if "{" in where and "}" in where:
        return "is a brace pattern"
    if _within(cfg.run_root, where):
        return "is the run root or a folder holding it"
    for name in STAGE_FOLDERS:
        if _within(where, f"{cfg.run_root}/{name}"):
            return f"lies in the run root's {name}/ folder, which the stages write and delete"
    return None


def _refuse(setting: str, where: object, why: str) -> ValueError:
    return ValueError(
        f"{setting}={where} {why}, but data.demo would generate the demo dataset there, and mode_ray never "
        f"writes into or deletes data it did not make. Either use that data as it is — no generation: --set "
        f"data.demo=null (configs/own-data.yaml is the starting point for your own shards) — or point "
        f"{setting} at a new or empty folder."
    )


def demo_targets(cfg: Config) -> list[DemoTarget]:
    """Where the demo data goes, checked before anything is written (an error names the way out)."""
    demo = cfg.data.demo
    if demo is None:
        return []
    targets = [DemoTarget("data.shards", cfg.data.shards, "train", demo.samples, demo.shards)]
    if cfg.eval.shards:
        targets.append(DemoTarget("eval.shards", cfg.eval.shards, "eval", demo.eval_samples, demo.eval_shards))
    for target in targets:
        why = _why_not(cfg, target.out)
        if why:
            raise _refuse(target.setting, target.out, why)
    if len(targets) == 2 and (_within(targets[0].out, targets[1].out) or _within(targets[1].out, targets[0].out)):
        why = f"overlaps eval.shards={targets[1].out} (one split's shards would be read as the other's)"
        raise _refuse("data.shards", targets[0].out, why)
    return targets


def demo_settings(cfg: Config, target: DemoTarget) -> str:
    demo = cfg.data.demo
    assert demo is not None
    return (
        f"{demo_data.GENERATOR_VERSION}/{target.split}/{target.samples}/{target.shards}/{demo.seed}/{demo.faults}/"
        f"{cfg.data.max_image_pixels}"
        + (f"/{'+'.join(demo.domains)}" if demo.domains and target.split == "train" else "")
        + (f"/{demo.difficulty}" if demo.difficulty != "standard" else "")  # the standard demo keeps its hash
    )


def check_demo_locations(cfg: Config) -> None:
    """Every demo location is fit to generate into (its name and what it holds), before any is written."""
    for target in demo_targets(cfg):
        found = entries(target.out, cfg.data.s3)
        if found and not demo_data.made_by_generator(target.out, cfg.data.s3):
            raise _refuse(
                target.setting, target.out, f"holds files the demo generator did not write ({listing(found)})"
            )


def _generate(cfg: Config, target: DemoTarget) -> dict:
    demo = cfg.data.demo
    assert demo is not None
    train = target.split == "train"
    return demo_data.generate(
        target.out,
        samples=target.samples,
        shards=target.shards,
        seed=demo.seed,
        split=target.split,
        faults=demo.faults and train,
        max_image_pixels=cfg.data.max_image_pixels,
        s3=cfg.data.s3,
        domains=demo.domains if train else None,
        difficulty=demo.difficulty,
    )


def run_demo_data(cfg: Config, force: bool = False) -> list[dict]:
    """Write the demo train/eval shards unless shards of the same settings are already there."""
    check_demo_locations(cfg)
    if cfg.data.demo is not None:
        claim_run_root(cfg.run_root, cfg.data.s3)
    records = []
    for target in demo_targets(cfg):
        settings = demo_settings(cfg, target)
        with stage_log(f"demo-data ({target.split})") as log:
            if not force and stage_done(target.out, settings, cfg.data.s3):
                log.skip(f"{target.out} is complete")
                continue
            record = _generate(cfg, target)  # empties a folder of its own first, refuses others
            mark_done(target.out, settings, cfg.data.s3, samples=record["samples"])
            log.done(f"{record['samples']} samples in {len(record['shards'])} shards at {target.out}")
            records.append(record)
    return records
