"""`ray job submit` against a real local head: the whole pipeline as a job, and a job that must fail clearly.

The head is this module's own (`ray start --head` on 127.0.0.1 with the dashboard and its own temp dir), so
the test session's Ray is never touched: it is stopped by killing the processes that carry its temp dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

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
    "moe.enabled=false",  # tests/test_moe.py builds one; here it would only add minutes
    "training.use_seed=false",  # experts and generalist from scratch, side by side: the job's wiring, not the recipe
    "eval.retrieval=false",
)


def _env() -> dict[str, str]:
    """This venv first on PATH: the head, and so every job's `python`, run this project's interpreter."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def head():
    """A one-node head with the job API on 127.0.0.1; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="mr-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
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
    subprocess.run(start, check=True, env=_env(), capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        yield url
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


def test_whole_pipeline_as_a_job_succeeds_and_writes_its_outputs(head, tmp_path):
    root = tmp_path / "run"
    settings = (*TINY, f"run_root={root}", f"serve.port={_free_port()}")
    job = _submit(head, "python", "-m", "jobs.run", "--config", "configs/demo.yaml", *_sets(*settings))
    status, logs = _wait(head, job, timeout=900)
    assert status == "SUCCEEDED", logs[-3000:]
    for done in ("manifest/_SUCCESS", "experts/generalist/_SUCCESS", "eval/report.md"):
        assert (root / done).exists(), done
    assert "serve self-check" in logs
    # What an operator reads: a line per stage, a bar per trial with its loss, no traceback, under 100 lines.
    lines = logs.strip().splitlines()
    assert len(lines) < 100 and "Traceback" not in logs, "\n".join(lines)
    assert any(line.strip().startswith("generalist") and "loss" in line for line in lines), logs[-3000:]


def test_a_job_on_missing_shards_fails_with_its_reason(head, tmp_path):
    settings = (f"run_root={tmp_path / 'run'}", f"data.shards={tmp_path / 'nowhere'}", "data.demo=null")
    job = _submit(head, "python", "-m", "jobs.prep", "--config", "configs/demo.yaml", *_sets(*settings))
    status, logs = _wait(head, job, timeout=300)
    assert status == "FAILED"
    last = logs.strip().splitlines()[-1]
    assert last.startswith("job failed:") and "nowhere" in last
