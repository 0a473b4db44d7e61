"""`ray job submit` against a real local head: the whole pipeline as a job on an `s3://` run root under the
reference preset, the MoE included (killed, resubmitted, resumed from the bucket, then grown with new data from
the bucket), and a job that must fail clearly.

The head is this module's own (`ray start --head` on 127.0.0.1 with the dashboard and its own temp dir), so
the test session's Ray is never touched: it is stopped by killing the processes that carry its mark. Its
processes get TMPDIR and HOME inside that temp dir too, so every file a job writes on this machine is there
to be listed. The head and the pipeline's jobs run at idle priority beside the rest of the suite from the
session's start, and this module runs last (tests/bucket_job.py says why); its tests assert what they did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import bucket_job
from tests.background import sets
from tests.bucket_job import BucketRun, keys, read_object, submit, wait
from tests.conftest import REPO

# What Ray itself keeps on a node's disk while a job runs on an s3:// run root, none of it run output: its logs,
# sockets and port files, its Prometheus service-discovery file, the job's unpacked working dir
# (runtime_resources/); caches are in HOME/.cache (matplotlib's font list).
RAY_OWN = ("/logs/", "/sockets/", "/runtime_resources/", "/home/.cache/", "/home/.config/",
           "/prom_metrics_service_discovery.json")  # fmt: skip


@pytest.fixture(scope="module")
def head() -> tuple[str, Path]:
    """A one-node head with the job API on 127.0.0.1 that has run a job: its URL and temp dir. Started with the
    session when it collected this module (tests/bucket_job.py), or now."""
    return bucket_job.start(pipeline=False).head()


@pytest.fixture(scope="module")
def bucket_run(head) -> BucketRun:
    """The pipeline as a job on an s3:// run root, stopped once prep is done and resubmitted, then add-data:
    run beside the rest of the suite since the session started (tests/bucket_job.py)."""
    return bucket_job.start(pipeline=True).bucket_run()


def _written_here(temp: Path, since: float) -> list[str]:
    """Files under the head's temp dir (its processes' TMPDIR and HOME included) written since `since`, but
    Ray's own (RAY_OWN) and its port and session files at the top of a session folder."""
    out = []
    for path in temp.rglob("*"):
        name = "/" + str(path.relative_to(temp))
        if not path.is_file() or path.stat().st_mtime < since or any(own in name for own in RAY_OWN):
            continue
        if name.count("/") <= 3 and "/session_" in name:  # session_*/{*_port_*, session.json, …}
            continue
        out.append(name)
    return out


def test_whole_pipeline_as_a_job_on_s3_is_killed_and_resumes_from_the_bucket(bucket_run: BucketRun):
    """Resubmitted, the job finishes from what the bucket holds (prep is not run again); every output is in
    the bucket (prep, models, the MoE, tracking, the report). (tests/test_train.py shows a job resuming from
    its checkpoint, tests/test_storage.py that checkpoints go to the run root's own store.)"""
    b, logs = bucket_run, bucket_run.pipeline.logs
    assert b.pipeline.status == "SUCCEEDED", logs[-3000:]
    objects = keys(b.client, f"{b.run}/")
    outputs = ("manifest/_SUCCESS", "experts/generalist/_SUCCESS", "moe/summary.json", "eval/report.md",
               "eval/report.png")  # fmt: skip
    for output in outputs:
        assert f"{b.run}/{output}" in objects, output
    assert any(k.startswith(f"{b.run}/moe/model/") for k in objects)  # the upcycled CLIP-MoE, in the bucket
    assert any(k.startswith(f"{b.run}/tracking/generalist/events.out.tfevents") for k in objects)  # mirrored up
    resumed = read_object(b.client, b.prep_marker)["finished_at"]
    assert resumed == b.prep_finished, f"{b.prep_marker} was written again after the resubmission"
    assert "serve self-check" in logs and "| moe " in logs.replace("│", "|")  # the MoE evaluated
    # What an operator reads: a line per stage, a bar per trial with its loss, no traceback, under 100 lines.
    lines = logs.strip().splitlines()
    assert len(lines) < 100 and "Traceback" not in logs, "\n".join(lines)
    assert any(line.strip().startswith("generalist") and "loss" in line for line in lines), logs[-3000:]


def test_the_reference_preset_goes_end_to_end_in_the_bucket(bucket_run: BucketRun):
    """The job ran under `preset: reference`: prep (Euclidean k-means, raw means), training (cosine after warmup,
    captions drawn per read from the decoded cache's tokens), the CLIP-MoE (the reference's optimizer, pooled
    balance loss, truncated round-robin MCL batches, router with label smoothing and a fixed temperature) and
    the reference router on raw means, all on one tiny run: the switches work together, not only one by one
    (tests/test_reference_fidelity.py checks each against the references' code). The MoE upcycles the seed (the
    preset does not choose the base; the default's generalist is upcycled in tests/test_moe.py)."""
    from mode_ray.config import RoutingConfig, load_config
    from mode_ray.routing.router import TaskRouter
    from mode_ray.routing.weights import reference_weights
    from mode_ray.run_root.layout import RunPaths, read_centroids
    from mode_ray.run_root.storage import parquet_dataset, read_json

    b = bucket_run
    assert b.pipeline.status == "SUCCEEDED", "the pipeline job failed (see the test before)"
    cfg = load_config(REPO / "configs/demo.yaml", list(b.settings))
    assert (cfg.clustering.geometry, cfg.training.caption_draw, cfg.moe.balance_form) == (
        "euclidean",
        "per_read",
        "reference",
    )
    paths, s3 = RunPaths(cfg.run_root), cfg.data.s3
    assert read_json(paths.prep_summary, s3)["clustering"]["geometry"] == "euclidean"
    cents = read_centroids(paths.centroids, s3)
    np.testing.assert_allclose(cents["fine"], cents["fine_raw"], atol=1e-5)  # euclidean: the centres are the means
    texts = parquet_dataset(paths.manifest, s3).to_table(columns=["texts"])["texts"].to_pylist()
    assert texts and all(len(t) == 2 for t in texts)  # the demo's two phrasings, kept for reads
    models = ["expert-0", "expert-1", "expert-2", "generalist", "seed"]  # expert-2: add-data's, after the pipeline
    assert sorted(read_json(paths.experts_summary, s3)["models"]) == models
    plan = read_json(f"{paths.moe('stage-1')}/plan.json", s3)
    assert plan["rows_repeated_to_fill_batches"] == 0 and plan["rows_dropped_by_truncation"] > 0
    moe = read_json(paths.moe_summary, s3)
    assert moe["router"] and moe["stages"]
    router = TaskRouter.from_run(cfg.run_root, cfg.embedding, RoutingConfig(), s3)
    labels = ["a red star", "a green circle", "the digit seven"]
    got = router.route(labels, ("{}",), "reference")
    emb = router._embed(tuple(labels), ("{}",))
    expected = reference_weights(emb, cents["fine_raw"], cents["fine_to_coarse"], len(cents["coarse"]))
    np.testing.assert_allclose(got.weights, expected.weights)


def test_new_data_in_the_bucket_grows_the_run_there_and_nothing_is_written_here(bucket_run: BucketRun):
    """`mode-ray add-data` as a job: a domain the run's clusters do not cover, read from the bucket, becomes a
    new expert trained, exported and registered in the bucket; over both jobs, no file they made is on this
    machine's disk."""
    b = bucket_run
    assert b.pipeline.status == "SUCCEEDED", "the pipeline job failed (see the test before)"
    assert b.grow.status == "SUCCEEDED", b.grow.logs[-3000:]
    objects = keys(b.client, f"{b.run}/")
    for output in ("generations/food/manifest/_SUCCESS", "experts/expert-2/_SUCCESS", "experts/expert-2/export/"):
        assert any(k.startswith(f"{b.run}/{output}") for k in objects), output
    assert "expert-2" in read_object(b.client, f"{b.run}/experts/registry.json")["experts"]
    assert _written_here(b.temp, b.started) == []


def test_a_job_on_missing_shards_fails_with_its_reason(head, tmp_path):
    url, _ = head
    settings = (f"run_root={tmp_path / 'run'}", f"data.shards={tmp_path / 'nowhere'}", "data.demo=null")
    job = submit(url, "python", "-m", "jobs.prep", "--config", "configs/demo.yaml", *sets(*settings))
    result = wait(url, job, timeout=300)
    assert result.status == "FAILED"
    last = result.logs.strip().splitlines()[-1]
    assert last.startswith("job failed:") and "nowhere" in last
