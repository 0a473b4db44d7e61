"""Which trained experts are in service: experts/registry.json.

Experts trained by `mode-ray train` are in service unless taken out. Experts added by `mode-ray add-data`
are recorded here with when they came, from which data and their cluster size; `mode-ray experts remove`
takes one out of routing, evaluation and serving (its files stay). Every change bumps `version`, which a
running `mode-ray serve` watches to redeploy in place.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from mode_ray.config import Config
from mode_ray.layout import RunPaths
from mode_ray.storage import exists, join, read_json, write_json


def registry_url(cfg: Config) -> str:
    return join(RunPaths(cfg.run_root).experts(), "registry.json")


def read_registry(cfg: Config) -> dict[str, Any]:
    url = registry_url(cfg)
    return read_json(url, cfg.data.s3) if exists(url, cfg.data.s3) else {"version": 0, "experts": {}}


def _write(cfg: Config, registry: dict[str, Any]) -> None:
    registry["version"] = registry.get("version", 0) + 1
    write_json(registry_url(cfg), registry, cfg.data.s3)


def record_added(cfg: Config, name: str, generation: str, cluster_size: int) -> None:
    registry = read_registry(cfg)
    registry["experts"][name] = {
        "added": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "generation": generation,
        "cluster_size": int(cluster_size),
        "active": True,
    }
    _write(cfg, registry)


def set_active(cfg: Config, name: str, active: bool, trained: list[str]) -> None:
    """Take an expert out of service (or back in); `trained`: the models the run has."""
    if name not in trained or not name.startswith("expert-"):
        raise ValueError(f"no data expert {name!r} in {cfg.run_root} (have {[n for n in trained if 'expert-' in n]})")
    registry = read_registry(cfg)
    entry = registry["experts"].setdefault(name, {"added": None, "generation": None, "cluster_size": None})
    entry["active"] = active
    _write(cfg, registry)


def in_service(cfg: Config, names: list[str]) -> list[str]:
    """`names` without the experts taken out of service."""
    removed = {n for n, e in read_registry(cfg)["experts"].items() if not e.get("active", True)}
    return [n for n in names if n not in removed]
