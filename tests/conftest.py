"""Shared fixtures: one Ray instance per test session, sized for a 2-core machine."""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from mode_ray.ray_env.runtime import embedded_ray_environment

# Explicit, so local clusters started by tests do not switch token auth on behind our back.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Credentials for the moto S3 server on 127.0.0.1; set before Ray starts so its workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
embedded_ray_environment()  # the product's, for the session's Ray and the `ray start` heads tests launch

REPO = Path(__file__).resolve().parents[1]

# One /proc scan and one free-port probe for tests and benchmarks alike (re-exported for the tests).
from bench.autoscale_local import _free_port, pids_naming  # noqa: E402, F401


@pytest.hookimpl(trylast=True)  # after `-k` and `-m` have deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Self-contained work the collected tests need starts now, beside the other tests at idle priority
    (tests/background.py), and the modules that assert it run last: the benchmarks', then the jobs' (whose
    head also serves a test of its own)."""
    if config.option.collectonly:
        return
    for module in ("test_bench_quality.py", "test_jobs.py"):
        last = [item for item in items if item.path.name == module]
        items[:] = [item for item in items if item.path.name != module] + last
    if any("bench_runs" in item.fixturenames for item in items):
        from tests import bench_in_background

        bench_in_background.start()
    if jobs := [item for item in items if item.path.name == "test_jobs.py"]:
        from tests import bucket_job

        bucket_job.start(pipeline=any("bucket_run" in item.fixturenames for item in jobs))


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "tests.background" in sys.modules:
        sys.modules["tests.background"].close_all()


def session_workers(title: str) -> list[int]:
    """This session's Ray workers titled `ray::{title}`, not those of a Ray running beside it
    (tests/background.py), whose processes carry its mark in their environment."""
    from tests.background import BACKGROUND_MARK

    def in_the_background(pid: int) -> bool:
        try:
            return f"{BACKGROUND_MARK}=".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return True  # gone, or not ours to read

    return [pid for pid in pids_naming(title, prefix="ray::") if not in_the_background(pid)]


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
    from mode_ray.demo import demo_data

    out = tmp_path_factory.mktemp("demo")
    record = demo_data.generate(str(out), samples=300, shards=3, seed=7, faults=True, max_image_pixels=250_000)
    return out, record


class S3Server:
    """moto's S3 server on a fixed port, which a test can stop (an outage) and start again: the objects live
    in moto's in-process backend, so they outlast the HTTP server."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        if self.server is not None:
            return
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request in a failed test's output
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # moto's stop keeps the port bound: free it for start()
            self.server = None


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, with one bucket."""
    import boto3

    server = S3Server()
    server.start()
    boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1").create_bucket(Bucket="mode-test")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server.endpoint


def demo_config(run_root, shards, *overrides: str):
    """The demo config pointed at a test's own run root and shards, with small clusters."""
    from mode_ray.config import load_config

    return load_config(
        REPO / "configs/demo.yaml",
        [
            f"run_root={run_root}",
            f"data.shards={shards}",
            "data.demo=null",
            "clustering.n_fine=16",
            "clustering.n_coarse=4",
            "embedding.batch_size=128",
            "training.model=mode-tiny",
            *overrides,
        ],
    )


PREP_PARTS = ("prep", "manifest", "train_inputs", "clusters", "embeddings", "rejects")


def linked_run_root(source_root: str, root: Path, *more: str) -> Path:
    """A run root of ours whose prep (and the `more` parts) are links into `source_root`: a test trains on a
    shared run's prep without paying for a prep of its own, and leaves that run alone."""
    from mode_ray.run_root.ownership import claim_run_root

    claim_run_root(str(root))  # ours before the links go in
    for name in (*PREP_PARTS, *more):
        os.symlink(os.path.join(source_root, name), Path(root) / name)
    return Path(root)


@functools.cache
def serve_port() -> int:
    """One Serve instance for the session, on this port (free when first asked for): each module deploys its
    app and deletes it when done (`undeploy`), instead of starting and shutting down Serve's controller and
    proxy in every module."""
    return _free_port()


def undeploy(cfg) -> None:
    """Delete a test's app; Serve itself keeps running for the next module (the session's Ray ends it)."""
    from ray import serve

    serve.delete(cfg.serve.app_name)


def served_config(eval_cfg, *overrides: str):
    """The evaluated run's config for a Serve deployment on the session's port, small replicas, plus
    `overrides`."""
    return demo_config(
        eval_cfg.run_root,
        eval_cfg.data.shards,
        "clustering.n_coarse=2",
        f"eval.shards={eval_cfg.eval.shards}",
        "eval.demo_tasks=true",
        f"serve.port={serve_port()}",
        "serve.ingress.num_cpus=0.1",
        "serve.experts.num_cpus=0.1",
        *overrides,
    )


TRAIN_BATCH = 32
TRAIN_EPOCH = 256  # samples an epoch: 8 steps of TRAIN_BATCH; an expert's partition (~240 rows) is drawn twice


TRAINED_RUN_SETTINGS = (
    "clustering.n_coarse=2",
    f"training.samples_per_epoch={TRAIN_EPOCH}",
    "training.epochs=4",
    "training.seed_fraction=0.5",
    f"training.batch_size={TRAIN_BATCH}",
    "training.warmup_steps=5",
    "training.run.log_every_steps=4",
    "training.run.checkpoint_every_epochs=1",
    "training.matched_control=true",  # off in the demo config, checked here
)
TWO_WORKERS = ("training.run.num_workers=2", "training.run.cpus_per_worker=0.5")  # data-parallel jobs (gloo)


@pytest.fixture(scope="session")
def trained_run(ray_session, tmp_path_factory):
    """A small demo run, prepped and trained once per session (seed, 2 experts, generalist, generalist-matched);
    the generalist fails once on purpose, to exercise recovery. Eval and Serve tests reuse it."""
    from mode_ray.demo import demo_data
    from mode_ray.runner.trial import failure_marker_path
    from mode_ray.stages.prep import run_prep
    from mode_ray.stages.train import run_train

    shards = tmp_path_factory.mktemp("train-shards")
    demo_data.generate(str(shards), samples=500, shards=2, seed=5)
    run_root = tmp_path_factory.mktemp("train-run")
    base = TRAINED_RUN_SETTINGS
    prep = run_prep(demo_config(run_root, shards, *base))
    steps_per_epoch = TRAIN_EPOCH // TRAIN_BATCH
    # The generalist (steps 16..32) raises once after its first checkpoint (step 24): it must resume from it.
    fail_at = 3 * steps_per_epoch + 3
    cfg = demo_config(run_root, shards, *base, f"training.run.fail_once_at_step={{generalist: {fail_at}}}")
    marker = failure_marker_path(cfg, "generalist")
    if os.path.exists(marker):
        os.remove(marker)
    summary = run_train(cfg)
    return cfg, prep, summary


def _shape_folder(root: Path) -> Path:
    """An ImageFolder-style task: circle/ and square/ images, plus one file that is not an image."""
    import numpy as np

    from mode_ray.demo import demo_data

    rng = np.random.default_rng(3)
    counts = Counter()
    while min(counts["circle"], counts["square"]) < 6:
        img, attrs = demo_data.DRAW["shapes"](rng, "eval")
        if attrs["shape"] in ("circle", "square") and counts[attrs["shape"]] < 6:
            (root / attrs["shape"]).mkdir(parents=True, exist_ok=True)
            img.save(root / attrs["shape"] / f"{counts[attrs['shape']]}.jpg")
            counts[attrs["shape"]] += 1
    (root / "circle" / "broken.jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="session")
def evaluated_run(trained_run, tmp_path_factory):
    """The trained run evaluated on the five demo tasks, a folder task and retrieval."""
    from mode_ray.demo import demo_data
    from mode_ray.stages.evaluate import run_eval

    cfg, _, _ = trained_run
    eval_shards = tmp_path_factory.mktemp("eval-shards")
    demo_data.generate(str(eval_shards), samples=150, shards=1, seed=9, split="eval")
    folder = _shape_folder(tmp_path_factory.mktemp("folder-task"))
    task = (
        f"[{{name: folder-shapes, source: folder, location: '{folder}', "
        "class_names: [circle, square], templates: ['a {} shape.']}]"
    )
    cfg = demo_config(
        cfg.run_root,
        cfg.data.shards,
        "clustering.n_coarse=2",
        f"eval.shards={eval_shards}",
        "eval.demo_tasks=true",
        f"eval.tasks={task}",
    )
    return cfg, run_eval(cfg)
