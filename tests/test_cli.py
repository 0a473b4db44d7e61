from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mode_ray.config import load_config
from tests.conftest import REPO


def _mode_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mode_ray.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_demo_data_command(tmp_path):
    out = tmp_path / "shards"
    proc = _mode_ray("demo-data", "--out", str(out), "--samples", "200", "--shards", "2", "--faults")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "dataset.json").read_text())
    assert record["clean_samples"] == 200 and len(record["faults"]) == 7
    assert (out / "0/0.tar").is_file() and (out / "2/2.tar").is_file()
    bad = _mode_ray("demo-data", "--out", str(tmp_path / "x"), "--samples", "2", "--shards", "5")
    assert bad.returncode == 2 and "empty shards" in bad.stderr


def test_run_generates_then_skips(tmp_path):
    args = (
        "run",
        "--config",
        "configs/demo.yaml",
        "--set",
        f"run_root={tmp_path}",
        "--set",
        "data.demo.samples=150",
        "--set",
        "data.demo.eval_samples=40",
    )
    first = _mode_ray(*args, "--only", "demo-data")
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "config.yaml").is_file()
    assert json.loads((tmp_path / "data/train/dataset.json").read_text())["clean_samples"] == 150
    assert json.loads((tmp_path / "data/eval/dataset.json").read_text())["split"] == "eval"
    second = _mode_ray(*args, "--only", "demo-data")
    assert second.returncode == 0 and second.stderr.count("skipped") == 2


def test_bad_config_is_a_clear_error(tmp_path):
    proc = _mode_ray("run", "--config", "configs/demo.yaml", "--set", "training.lr=fast")
    assert proc.returncode == 2
    assert "training.lr" in proc.stderr


def test_a_failing_stage_prints_its_reason_and_where_the_logs_are(tmp_path):
    proc = _mode_ray(
        "run", "--config", "configs/demo.yaml", "--set", f"run_root={tmp_path}", "--set", "data.demo=null",
        "--set", f"data.shards={tmp_path / 'nowhere'}", "--only", "prep",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "full logs: " in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_embedded_ray_asks_for_token_auth_itself(monkeypatch):
    """Unset, RAY_AUTH_MODE becomes `token` (Ray's own default, asked for: no notice) and Ray's cached config is
    re-read; a mode the user set stays."""
    import ray._raylet

    from mode_ray.ray_env.runtime import _explicit_token_auth

    reread: list[str] = []

    class Config:
        @staticmethod
        def initialize(config: str) -> None:
            reread.append(config)

    monkeypatch.setattr(ray._raylet, "Config", Config)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    _explicit_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and not reread
    monkeypatch.delenv("RAY_AUTH_MODE")
    _explicit_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token" and reread == [""]


@pytest.mark.parametrize("name", ["demo.yaml", "own-data.yaml"])
def test_the_prep_pipelines_never_hold_every_cpu(name, tmp_path):
    """Beside the embedding (and assign) actors, Ray Data runs 1-CPU read/write and 0.5-CPU validate tasks: no
    mix of them may fill the embedded Ray, or write_parquet, which looks for a free CPU as it returns, warns
    that the job "will hang unless more CPUs are freed up"."""
    cfg = load_config(REPO / "configs" / name, [f"data.shards={tmp_path}", f"eval.shards={tmp_path}"])
    left = cfg.ray.num_cpus - cfg.embedding.num_cpus_per_actor * cfg.embedding.max_actors
    assert left >= 1 and (left * 2) % 1 != 0  # one read or write fits; tasks of 1 and 0.5 CPU never sum to it


def test_an_error_with_markup_characters_is_printed_as_its_text():
    """An error's text reaches the console as written, brackets included (rich once read `[/:]` in an S3 error
    as a closing tag and raised MarkupError instead of printing the reason)."""
    from mode_ray.cli import _fail
    from mode_ray.console.progress import console

    reason = 'Invalid bucket name "s3:": Bucket name must match the regex "^[a-zA-Z0-9.\\-_]{1,255}$" or [/:] [red]x'
    with console.capture() as captured:
        _fail(RuntimeError(reason), 1)
    assert reason in captured.get()


def test_a_failed_jobs_reason_is_its_exception_line_not_the_last_line_of_a_traceback():
    """Ray's training errors end with a worker's traceback or an excerpt of one: the console once said only
    `seed failed:   File "/work/m` for an s3 endpoint error."""
    from mode_ray.console.progress import error_reason

    ray_error = (
        "ray.train.WorkerGroupError: Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
        'Traceback (most recent call last):\n  File "/x/loop.py", line 3, in train\n'
        'botocore.exceptions.EndpointConnectionError: Could not connect to the endpoint URL: "https://b/"\n'
        '  File "/work/m'
    )
    assert error_reason(ray_error).startswith("botocore.exceptions.EndpointConnectionError: Could not connect")
    assert error_reason("disk full [/:]") == "disk full [/:]"  # no exception line: the last line, as written
    assert error_reason("ValueError: " + "x" * 500) == ("ValueError: " + "x" * 500)[:300]
