"""Shared fixtures: one Ray instance per test session, sized for a 2-core machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Explicit, so local clusters started by tests do not switch token auth on behind our back.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once: 2 CPUs, a capped object store, no dashboard."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> tuple[Path, dict]:
    """A small faulted demo dataset shared by the read-back tests."""
    from mode_ray import demo_data

    out = tmp_path_factory.mktemp("demo")
    record = demo_data.generate(str(out), samples=300, shards=3, seed=7, faults=True, max_image_pixels=250_000)
    return out, record
