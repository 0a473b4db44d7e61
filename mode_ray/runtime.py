"""Starting (or joining) Ray from the config: an embedded local instance, or a cluster address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mode_ray.config import Config

# Passed to every worker, so the offline encoder and the s3 settings behave the same on a cluster.
_FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)


IDLE_WORKERS = 8


def cluster_address(cfg: Config) -> str | None:
    """The Ray cluster to join: `ray.address`, or the one a `ray job submit` driver runs in (Ray sets
    RAY_ADDRESS for it); None means start an embedded Ray from the `ray` section."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_runtime(cfg: Config) -> Iterator[None]:
    """Use the running Ray if there is one (tests, `ray job submit`); else start one and shut it down after."""
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Keep idle worker processes (Ray's default keeps one per CPU): each training trial's read tasks then
    # reuse processes that already imported their libraries instead of paying for it again (measured on 2
    # cores: a trial's first steps ran 3x slower beside cold processes).
    os.environ.setdefault("RAY_num_workers_soft_limit", str(IDLE_WORKERS))
    env = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    kwargs: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    address = cluster_address(cfg)
    if address:  # joining: the cluster's own resources apply; the `ray` section's local-start settings do not
        kwargs["address"] = address
        ignored = [k for k in ("num_cpus", "object_store_memory_mb") if getattr(cfg.ray, k) is not None]
        if ignored:
            from mode_ray.progress import console

            console.print(f"  joining the Ray cluster at {address}: ray.{', ray.'.join(ignored)} ignored")
    else:
        kwargs["num_cpus"] = cfg.ray.num_cpus
        kwargs["include_dashboard"] = cfg.ray.include_dashboard
        if cfg.ray.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
