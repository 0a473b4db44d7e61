"""tests/test_jobs.py's `ray job submit` head and its `s3://` pipeline job, run beside the rest of the suite.

That module's work is the suite's longest by far — the whole pipeline as a job on an s3:// run root, stopped
once prep is done and resubmitted, then `add-data` as a second job: ~4.5 minutes alone. So when a session
collects a test that needs it, conftest starts it at once, at idle priority (tests/background.py), and runs
that module last; its fixtures wait here for what it did. Every process it starts runs at that priority: the
head once it is up (and so every Ray worker and job driver on it), the `ray job submit` CLI, its S3 server.
What it did is asserted by the tests, not here.

Its S3 server is moto's in a process of its own: the session's (tests/conftest.py) is stopped and started again
by the outage tests, which would be an outage for this job too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.autoscale_local import _free_port
from tests.background import background_env, demote, kill_marked, low_priority, sets, started

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "mode-test"
# Wall-clock limits: beside a busy suite the job gets only what is left over, so these are far above its ~5
# minutes alone; they only bound a job that hangs.
MANIFEST_TIMEOUT_S, PIPELINE_TIMEOUT_S, GROW_TIMEOUT_S = 1200, 1800, 900
TINY = (
    # The reference's settings (DESIGN §7) on the bucket: Euclidean k-means on raw means, captions drawn per read
    # from each sample's `texts`, the CLIP-MoE's optimizer, batches and balance loss, the reference router.
    "preset=reference",
    "data.caption_field=texts",
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
    "moe.stages=2",  # one MCL stage and the router, upcycling the seed: a chain beside the experts' tails
    "moe.base=seed",
    "moe.image_clusters=2",
    "moe.text_clusters=2",
    "moe.mcl_optim.warmup_steps=1",
    "moe.router_optim.warmup_steps=1",
    "moe.router_epochs=0.25",
    "eval.retrieval=false",
)
FOOD = ("continual.name=food", "continual.min_expert_samples=40")  # add-data's new domain (tests/test_grow.py's)


@dataclass(frozen=True)
class JobResult:
    status: str  # Ray's JobStatus, or TIMEOUT
    logs: str


@dataclass(frozen=True)
class BucketRun:
    url: str  # the head's job API
    temp: Path  # the head's temp dir: its processes' TMPDIR and HOME
    client: Any  # boto3, on this job's S3 server
    run: str  # the run root's key prefix in the bucket
    settings: tuple[str, ...]
    started: float
    prep_marker: str  # manifest/_SUCCESS, and its finished_at before the resubmission
    prep_finished: str
    pipeline: JobResult  # the resubmitted pipeline job
    grow: JobResult  # then add-data on new data in the bucket (s3://…/<run>-food)


def env(temp: str | None = None) -> dict[str, str]:
    """This venv first on PATH: the head, and so every job's `python`, run this project's interpreter; with
    `temp`, the head's processes keep their temp files and home inside it, carry the background's mark and wait
    longer for processes to start."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    out = {**os.environ, "PATH": path, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    if temp:
        out.update(TMPDIR=os.path.join(temp, "tmp"), HOME=os.path.join(temp, "home"), **background_env(temp))
    return out


def keys(client: Any, prefix: str) -> dict[str, str]:
    """Every object under `prefix`: key → ETag."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def read_object(client: Any, key: str) -> dict:
    return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def start_head(temp: str) -> str:
    """`ray start --head` with everything in `temp`, then at idle priority; returns the job API's URL. Its ports
    are probed free, but a Ray starting at the same time (the session's, the benchmarks') can take one first: a
    start that fails is tried again on fresh ports, twice."""
    for folder in ("tmp", "home"):
        os.makedirs(os.path.join(temp, folder), exist_ok=True)
    for _ in range(3):
        port, dashboard = _free_port(), _free_port()
        start = [
            RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}", "--object-store-memory=300000000", "--disable-usage-stats",
            # its own agent ports: another Ray on this machine (the test session's) holds the default ones, and
            # a job agent that cannot bind leaves "No available agent to submit job"
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        ]  # fmt: skip
        out = subprocess.run(start, env=env(temp), capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            demote(temp)  # its processes carry `temp` as their mark (env)
            return f"http://127.0.0.1:{dashboard}"
        kill_marked(temp)  # what the failed start left
    raise RuntimeError(f"`ray start --head` failed three times:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def submit(url: str, *args: str) -> str:
    job = f"mode-ray-test-{uuid.uuid4().hex[:12]}"
    command = [*low_priority(), RAY, "job", "submit", "--address", url, "--submission-id", job, "--working-dir",
               str(REPO), "--no-wait", "--", *args]  # fmt: skip
    for _ in range(30):  # a fresh head's job agent takes a while to come up ("No available agent")
        out = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300, cwd=REPO)
        if out.returncode == 0 or "No available agent" not in out.stderr:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-3000:]
    return job


def wait(url: str, job: str, timeout: float) -> JobResult:
    """The job's end and logs; a job still running at `timeout` is stopped and reported as TIMEOUT."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return JobResult(str(status), client.get_job_logs(job))
        time.sleep(1)  # a status request costs the dashboard milliseconds
    client.stop_job(job)
    return JobResult("TIMEOUT", client.get_job_logs(job))


def stop(url: str, job: str) -> None:
    """Stop a job as `ray job stop` does, and wait until it has."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    client.stop_job(job)
    deadline = time.time() + 120
    while client.get_job_status(job) not in (JobStatus.STOPPED, JobStatus.FAILED, JobStatus.SUCCEEDED):
        assert time.time() < deadline, "the job did not stop"
        time.sleep(0.5)


def wait_for(client: Any, prefix: str, suffix: str, timeout: float) -> str | None:
    """The first key under `prefix` ending in `suffix` to appear in the bucket, polled."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := [k for k in keys(client, prefix) if k.endswith(suffix)]:
            return found[0]
        time.sleep(1)
    return None


class S3Process:
    """moto's S3 server in a process of its own at idle priority, with the bucket."""

    def __init__(self) -> None:
        self.endpoint = f"http://127.0.0.1:{_free_port()}"
        port = self.endpoint.rsplit(":", 1)[1]
        self.process = subprocess.Popen(
            [*low_priority(), sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = self._client_once_up()
        self.client.create_bucket(Bucket=BUCKET)

    def _client_once_up(self) -> Any:
        import boto3
        from botocore.exceptions import EndpointConnectionError

        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        deadline = time.time() + 120
        while True:
            try:
                client.list_buckets()
                return client
            except EndpointConnectionError:
                assert self.process.poll() is None and time.time() < deadline, "moto's server did not start"
                time.sleep(0.5)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class BucketJob:
    """The head, then (with `pipeline`) the s3:// pipeline job and add-data, driven from a thread of this
    process that only waits: the work is done by the head's processes, at idle priority."""

    def __init__(self, pipeline: bool) -> None:
        self.temp = tempfile.mkdtemp(prefix="mr-head-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.url: str | None = None
        self.s3: S3Process | None = None
        self.bucket: BucketRun | None = None
        self.error: str | None = None
        self._head_up, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(pipeline,), name="bucket-job", daemon=True)
        self._thread.start()

    def head(self) -> tuple[str, Path]:
        """The head's job API URL and temp dir, once it has run a job."""
        self._head_up.wait()
        self._raise_if_failed()
        return self.url, Path(self.temp)

    def bucket_run(self) -> BucketRun:
        self._done.wait()
        self._raise_if_failed()
        assert self.bucket is not None, "the pipeline was not started: no test collected at start needed it"
        return self.bucket

    def close(self) -> None:
        kill_marked(self.temp)
        if self.s3 is not None:
            self.s3.close()
        shutil.rmtree(self.temp, ignore_errors=True)

    def _raise_if_failed(self) -> None:
        if self.error:
            raise RuntimeError(f"the background bucket job failed:\n{self.error}")

    def _work(self, pipeline: bool) -> None:
        try:
            self.url = self._start_head()
            self._head_up.set()
            if pipeline:
                self.s3 = S3Process()
                self.bucket = self._pipeline(self.s3)
        except BaseException:  # noqa: BLE001 - reported to the tests that wait for it
            self.error = traceback.format_exc()
        finally:
            self._head_up.set()
            self._done.set()

    def _start_head(self) -> str:
        """A one-node head that has run a job. A fresh head can leave its first job pending for good while the
        raylet's runtime-env agent client fails at start ("on_read bad version"; Ray's issue 45353 is this
        race), once in six starts on 2026-12-06: a head whose first job does not finish in 180 s (at idle
        priority beside the suite) is replaced, once."""
        for attempt in range(2):
            url = start_head(self.temp)
            result = wait(url, submit(url, "python", "-c", "print('ready')"), timeout=180)
            if result.status == "SUCCEEDED" or attempt == 1:
                break
            kill_marked(self.temp)
            shutil.rmtree(self.temp, ignore_errors=True)
            os.makedirs(self.temp)
        assert result.status == "SUCCEEDED", f"a fresh head ran no job: {result.status}\n{result.logs[-2000:]}"
        return url

    def _pipeline(self, s3: S3Process) -> BucketRun:
        """The pipeline as a job on an s3:// run root (the MoE included, upcycling the seed beside the tails):
        stopped once prep is done, then resubmitted; then add-data on a new domain uploaded to the bucket."""
        url, client, run = self.url, s3.client, f"job-{uuid.uuid4().hex[:8]}"
        settings = (*TINY, f"run_root=s3://{BUCKET}/{run}", f"data.s3.endpoint_url={s3.endpoint}",
                    f"serve.port={_free_port()}")  # fmt: skip
        args = ("python", "-m", "jobs.run", "--config", "configs/demo.yaml", *sets(*settings))
        began = time.time()
        first = submit(url, *args)
        done = wait_for(client, f"{run}/manifest/", "/_SUCCESS", timeout=MANIFEST_TIMEOUT_S)
        if done is None:
            from ray.job_submission import JobSubmissionClient

            raise AssertionError(JobSubmissionClient(url).get_job_logs(first)[-3000:])
        stop(url, first)
        prep_finished = read_object(client, done)["finished_at"]
        pipeline = wait(url, submit(url, *args), timeout=PIPELINE_TIMEOUT_S)
        grow = JobResult("NOT RUN", "the pipeline job did not succeed")
        if pipeline.status == "SUCCEEDED":
            self._upload_food_shard(client, f"{run}-food/0.tar")
            food = (f"continual.shards=s3://{BUCKET}/{run}-food", *FOOD)
            command = ("python", "-m", "jobs.add_data", "--config", "configs/demo.yaml", *sets(*settings, *food))
            grow = wait(url, submit(url, *command), timeout=GROW_TIMEOUT_S)
        return BucketRun(url, Path(self.temp), client, run, settings, began, done, prep_finished, pipeline, grow)

    @staticmethod
    def _upload_food_shard(client: Any, key: str) -> None:
        """tests/test_grow.py's new domain (food photo captions) as one shard in the bucket; the local copy goes."""
        from tests.test_grow import _food_shards

        local = Path(tempfile.mkdtemp(prefix="mr-food-"))
        try:
            _food_shards(local / "food", 160)
            client.upload_file(str(local / "food" / "0.tar"), BUCKET, key)
        finally:
            shutil.rmtree(local)


def start(pipeline: bool) -> BucketJob:
    """Start it for this session (once)."""
    return started("bucket job", lambda: BucketJob(pipeline))
