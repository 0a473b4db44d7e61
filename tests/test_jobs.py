"""`ray job submit` against a real local head: the whole pipeline as a job, and a job that must fail clearly.

The head is this module's own (`ray start --head` on 127.0.0.1 with the dashboard and its own temp dir), so
the test session's Ray is never touched: it is stopped by killing the processes that carry its temp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, _free_port

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
    "training.checkpoint_every_epochs=2",
    "moe.enabled=false",  # tests/test_moe.py builds one; here it would only add minutes
    "eval.retrieval=false",
)


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}


@pytest.fixture(scope="module")
def head():
    """A one-node head with the job API on 127.0.0.1; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="mr-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = _free_port(), _free_port()
    start = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}", "--object-store-memory=300000000", "--disable-usage-stats",
    ]  # fmt: skip
    subprocess.run(start, check=True, env=_env(), capture_output=True, timeout=180)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        yield url
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp in part for part in proc.info["cmdline"] or []):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _submit(url: str, *args: str) -> str:
    out = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(REPO), "--no-wait", "--", *args],
        check=True, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    return next(w for w in out.stdout.split() if w.startswith("raysubmit_"))


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


def test_a_job_on_missing_shards_fails_with_its_reason(head, tmp_path):
    settings = (f"run_root={tmp_path / 'run'}", f"data.shards={tmp_path / 'nowhere'}", "data.demo=null")
    job = _submit(head, "python", "-m", "jobs.prep", "--config", "configs/demo.yaml", *_sets(*settings))
    status, logs = _wait(head, job, timeout=300)
    assert status == "FAILED"
    last = logs.strip().splitlines()[-1]
    assert last.startswith("job failed:") and "nowhere" in last
