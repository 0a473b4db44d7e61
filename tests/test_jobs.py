"""`ray job submit` against a real local head: the whole pipeline as a job on an `s3://` run root (killed,
resubmitted, resumed from the bucket, then grown with new data from the bucket), and a job that must fail
clearly.

The head is this module's own (`ray start --head` on 127.0.0.1 with the dashboard and its own temp dir), so
the test session's Ray is never touched: it is stopped by killing the processes that carry its temp dir. Its
processes get TMPDIR and HOME inside that temp dir too, so every file a job writes on this machine is there
to be listed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, _free_port, pids_naming

RAY = str(Path(sys.executable).with_name("ray"))
TINY = (
    "data.demo.samples=240",
    "data.demo.shards=2",
    "data.demo.eval_samples=60",
    "data.demo.eval_shards=1",
    "embedding.batch_size=128",
    "clustering.n_fine=8",
    "clustering.n_coarse=2",
    "training.model=mode-tiny",
    "training.samples_per_epoch=128",
    "training.epochs=2",
    "training.batch_size=32",
    "training.warmup_steps=2",
    "training.run.checkpoint_every_epochs=2",
    "training.seed_fraction=0.5",  # the seed's 4 steps, then each tail's 4: add-data's new experts start from it
    "moe.enabled=false",  # its two trials in a row would add a minute: tests/test_moe.py builds one
    "eval.retrieval=false",
)
# What Ray itself keeps on a node's disk while a job runs on an s3:// run root, none of it run output: its logs,
# sockets and port files, its Prometheus service-discovery file, the job's unpacked working dir
# (runtime_resources/); caches are in HOME/.cache (matplotlib's font list).
RAY_OWN = ("/logs/", "/sockets/", "/runtime_resources/", "/home/.cache/", "/home/.config/",
           "/prom_metrics_service_discovery.json")  # fmt: skip


def _env(temp: str | None = None) -> dict[str, str]:
    """This venv first on PATH: the head, and so every job's `python`, run this project's interpreter; with
    `temp`, the head's processes keep their temp files and home inside it."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    if temp:
        env.update(TMPDIR=os.path.join(temp, "tmp"), HOME=os.path.join(temp, "home"))
    return env


@pytest.fixture(scope="module")
def head():
    """A one-node head with the job API on 127.0.0.1; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="mr-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    for folder in ("tmp", "home"):
        os.makedirs(os.path.join(temp, folder))
    port, dashboard = _free_port(), _free_port()
    start = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}", "--object-store-memory=300000000", "--disable-usage-stats",
        # its own agent ports: another Ray on this machine (the test session's) holds the default ones, and a
        # job agent that cannot bind leaves "No available agent to submit job"
        f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=_env(temp), capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        yield url, Path(temp)
    finally:
        _kill_processes_mentioning(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_processes_mentioning(marker: str) -> None:
    """Kill every process whose command line holds `marker` (this head's temp dir): never `ray stop`, which
    would stop the test session's own Ray too."""
    for pid in pids_naming(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _submit(url: str, *args: str) -> str:
    job = f"mode-ray-test-{uuid.uuid4().hex[:12]}"
    command = [RAY, "job", "submit", "--address", url, "--submission-id", job, "--working-dir", str(REPO),
               "--no-wait", "--", *args]  # fmt: skip
    for _ in range(30):  # a fresh head's job agent takes a while to come up ("No available agent")
        out = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        if out.returncode == 0 or "No available agent" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-3000:]
    return job


def _wait(url: str, job: str, timeout: float) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status), client.get_job_logs(job)
        time.sleep(3)
    client.stop_job(job)
    return "TIMEOUT", client.get_job_logs(job)


def _sets(*settings: str) -> list[str]:
    return [x for s in settings for x in ("--set", s)]


def _bucket(s3_server) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


def _keys(client: Any, prefix: str) -> dict[str, str]:
    """Every object under `prefix`: key → ETag."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="mode-test", Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


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


def test_whole_pipeline_as_a_job_on_s3_is_killed_resumes_from_the_bucket_and_writes_nothing_here(
    head, s3_server, tmp_path
):
    """The pipeline as a job on an s3:// run root: stopped once prep is done, resubmitted, and finished from
    what the bucket holds (prep is not run again); then `add-data` as a job grows it with a new domain from the
    bucket (a new expert). Every output is in the bucket (prep, models, tracking, the report, the new
    generation and expert) and no file the runs made is on this machine's disk. (tests/test_train.py shows a job
    resuming from its checkpoint, tests/test_storage.py that checkpoints go to the run root's own store.)"""
    url, temp = head
    client, run = _bucket(s3_server), f"job-{uuid.uuid4().hex[:8]}"
    settings = (*TINY, f"run_root=s3://mode-test/{run}", f"data.s3.endpoint_url={s3_server.endpoint}",
                f"serve.port={_free_port()}")  # fmt: skip
    args = ("python", "-m", "jobs.run", "--config", "configs/demo.yaml", *_sets(*settings))
    started = time.time()
    first = _submit(url, *args)
    done = _wait_for(client, f"{run}/manifest/", "/_SUCCESS", timeout=600)
    assert done, _logs(url, first)[-3000:]
    _stop(url, first)
    finished_before = json.loads(client.get_object(Bucket="mode-test", Key=done)["Body"].read())["finished_at"]
    status, logs = _wait(url, _submit(url, *args), timeout=900)
    assert status == "SUCCEEDED", logs[-3000:]
    objects = _keys(client, f"{run}/")
    for output in ("manifest/_SUCCESS", "experts/generalist/_SUCCESS", "eval/report.md", "eval/report.png"):
        assert f"{run}/{output}" in objects, output
    assert any(k.startswith(f"{run}/tracking/generalist/events.out.tfevents") for k in objects)  # mirrored up
    resumed = json.loads(client.get_object(Bucket="mode-test", Key=done)["Body"].read())["finished_at"]
    assert resumed == finished_before, f"{done} was written again after the resubmission"
    assert "serve self-check" in logs
    # What an operator reads: a line per stage, a bar per trial with its loss, no traceback, under 100 lines.
    lines = logs.strip().splitlines()
    assert len(lines) < 100 and "Traceback" not in logs, "\n".join(lines)
    assert any(line.strip().startswith("generalist") and "loss" in line for line in lines), logs[-3000:]

    # New data from the bucket grows the run in the bucket (`mode-ray add-data` as a job): a domain its
    # clusters do not cover becomes a new expert, trained, exported and registered there.
    _upload_food_shard(client, tmp_path, f"{run}-food/0.tar")
    food = (f"continual.shards=s3://mode-test/{run}-food", "continual.name=food", "continual.min_expert_samples=40")
    grow = ("python", "-m", "jobs.add_data", "--config", "configs/demo.yaml", *_sets(*settings, *food))
    status, logs = _wait(url, _submit(url, *grow), timeout=600)
    assert status == "SUCCEEDED", logs[-3000:]
    objects = _keys(client, f"{run}/")
    for output in ("generations/food/manifest/_SUCCESS", "experts/expert-2/_SUCCESS", "experts/expert-2/export/"):
        assert any(k.startswith(f"{run}/{output}") for k in objects), output
    registry = json.loads(client.get_object(Bucket="mode-test", Key=f"{run}/experts/registry.json")["Body"].read())
    assert "expert-2" in registry["experts"], registry
    assert _written_here(temp, started) == [] and not any(tmp_path.iterdir())


def _upload_food_shard(client: Any, tmp_path: Path, key: str) -> None:
    """tests/test_grow.py's new domain (food photo captions) as one shard in the bucket; the local copy goes."""
    from tests.test_grow import _food_shards

    _food_shards(tmp_path / "food", 160)
    client.upload_file(str(tmp_path / "food" / "0.tar"), "mode-test", key)
    shutil.rmtree(tmp_path / "food")


def _wait_for(client: Any, prefix: str, suffix: str, timeout: float) -> str | None:
    """The first key under `prefix` ending in `suffix` to appear in the bucket, polled."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := [k for k in _keys(client, prefix) if k.endswith(suffix)]:
            return found[0]
        time.sleep(1)
    return None


def _logs(url: str, job: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url).get_job_logs(job)


def _stop(url: str, job: str) -> None:
    """Stop a job as `ray job stop` does, and wait until it has."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    client.stop_job(job)
    deadline = time.time() + 120
    while client.get_job_status(job) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.time() < deadline, "the job did not stop"
        time.sleep(1)


def test_a_job_on_missing_shards_fails_with_its_reason(head, tmp_path):
    url, _ = head
    settings = (f"run_root={tmp_path / 'run'}", f"data.shards={tmp_path / 'nowhere'}", "data.demo=null")
    job = _submit(url, "python", "-m", "jobs.prep", "--config", "configs/demo.yaml", *_sets(*settings))
    status, logs = _wait(url, job, timeout=300)
    assert status == "FAILED"
    last = logs.strip().splitlines()[-1]
    assert last.startswith("job failed:") and "nowhere" in last
