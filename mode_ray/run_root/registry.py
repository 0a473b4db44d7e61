"""Which trained experts are in service: experts/registry.json.

Experts trained by `mode-ray train` are in service unless taken out. Experts added by `mode-ray add-data`
are recorded here with when they came, from which data and their cluster size; `mode-ray experts remove`
takes one out of routing, evaluation and serving (its files stay). `add-data --refresh-experts` records each
retraining of an existing expert on its grown partition (with where its previous version was kept, for
`mode-ray experts rollback`). Every change bumps `version`, which a running `mode-ray serve` watches to
redeploy in place.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from mode_ray.config import Config
from mode_ray.run_root.layout import RunPaths
from mode_ray.run_root.storage import exists, join, read_json, write_json


def registry_url(cfg: Config) -> str:
    return join(RunPaths(cfg.run_root).experts(), "registry.json")


def read_registry(cfg: Config) -> dict[str, Any]:
    url = registry_url(cfg)
    return read_json(url, cfg.data.s3) if exists(url, cfg.data.s3) else {"version": 0, "experts": {}}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write(cfg: Config, registry: dict[str, Any]) -> None:
    registry["version"] = registry.get("version", 0) + 1
    write_json(registry_url(cfg), registry, cfg.data.s3)


def record_added(cfg: Config, name: str, generation: str, cluster_size: int) -> None:
    registry = read_registry(cfg)
    registry["experts"][name] = {
        "added": _now(),
        "generation": generation,
        "cluster_size": int(cluster_size),
        "active": True,
    }
    _write(cfg, registry)


def record_refreshed(cfg: Config, name: str, generation: str, cluster_size: int, previous: str) -> None:
    """`name` was retrained on its partition grown by `generation`; `previous`: its folder before."""
    registry = read_registry(cfg)
    entry = registry["experts"].setdefault(name, {"added": None, "generation": None, "active": True})
    before = entry.get("cluster_size")
    refresh = {"at": _now(), "generation": generation, "previous": previous, "cluster_size_before": before}
    entry["refreshes"] = [r for r in entry.get("refreshes", []) if r["generation"] != generation] + [refresh]
    entry["cluster_size"] = int(cluster_size)
    _write(cfg, registry)


def last_refresh(cfg: Config, name: str) -> dict[str, Any]:
    refreshes = read_registry(cfg)["experts"].get(name, {}).get("refreshes")
    if not refreshes:
        raise ValueError(f"{name} was never refreshed (add-data --refresh-experts): nothing to roll back")
    return refreshes[-1]


def pop_refresh(cfg: Config, name: str) -> None:
    """Forget `name`'s last refresh: its previous version is back in its folder."""
    registry = read_registry(cfg)
    entry = registry["experts"][name]
    entry["cluster_size"] = entry["refreshes"].pop()["cluster_size_before"]
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
