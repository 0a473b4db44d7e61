"""Never write into or delete data the project did not make; never hang on a setting the machine cannot meet."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mode_ray.config import load_config
from mode_ray.demo import demo_data
from mode_ray.pipeline import run_all
from mode_ray.ray_env.resources import Need, shortfalls
from mode_ray.run_root.ownership import STAMP, NotOursError, claim, claim_run_root, fresh_dir, remove_owned_tree
from tests.conftest import REPO, pids_naming

DEMO = REPO / "configs/demo.yaml"
SMALL = ("data.demo.samples=120", "data.demo.shards=2", "data.demo.eval_samples=30", "data.demo.eval_shards=1")


def _user_dataset(root: Path, samples: int = 60, shards: int = 2) -> Path:
    """A user's own shards in the MoDE layout (made with the generator, then its stamp and marker removed, as
    a researcher's data would have neither), with a file of theirs beside them."""
    demo_data.generate(str(root), samples=samples, shards=shards, seed=3)
    for ours in (STAMP, "_SUCCESS"):
        (root / ours).unlink(missing_ok=True)
    (root / "README.txt").write_text("my only copy")
    return root


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _mode_ray(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mode_ray.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("setting", ["data.shards", "eval.shards"])
def test_demo_run_on_a_users_shards_is_refused_and_leaves_them_byte_identical(tmp_path, setting):
    user = _user_dataset(tmp_path / "victim")
    before = _tree_digest(user)
    proc = _mode_ray(
        "run", "--config", str(DEMO), "--set", f"{setting}={user}", "--set", f"run_root={tmp_path / 'run'}",
        "--only", "demo-data",
    )  # fmt: skip
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert f"{setting}={user}" in message and "did not write" in message
    assert "--set data.demo=null" in message and "new or empty folder" in message  # the two ways out
    assert _tree_digest(user) == before
    assert not (tmp_path / "run").exists()  # refused before anything was written, the run's config included


@pytest.mark.parametrize(
    "setting, value, why",
    [
        ("data.shards", "{root}/shards/*/*.tar", "glob pattern"),
        ("eval.shards", "{root}/shards/*/*.tar", "glob pattern"),
        ("data.shards", "{root}/shards/{{0..3}}/x.tar", "brace pattern"),
        ("data.shards", '["{root}/a.tar", "{root}/b.tar"]', "list of shards"),
        ("eval.shards", "{root}/run", "run root"),
        ("data.shards", "{root}/run/manifest", "manifest/ folder"),
        ("data.shards", "{root}/run/data", "overlaps eval.shards"),
    ],
)
def test_locations_that_cannot_take_demo_data_are_refused_before_anything_is_written(tmp_path, setting, value, why):
    cfg = load_config(DEMO, [*SMALL, f"run_root={tmp_path / 'run'}", f"{setting}={value.format(root=tmp_path)}"])
    with pytest.raises(ValueError, match=why):
        run_all(cfg, only=["demo-data"])
    assert list(tmp_path.iterdir()) == []  # no '*' folder, no run root, nothing


def test_demo_regenerates_only_its_own_folder_and_leaves_no_stale_shards(tmp_path):
    out = tmp_path / "demo"
    demo_data.generate(str(out), samples=40, shards=4)
    demo_data.generate(str(out), samples=20, shards=2)  # fewer shards: the old 2/ and 3/ must not stay behind
    assert sorted(p.name for p in out.glob("*/*.tar")) == ["0.tar", "1.tar"]
    # A demo folder from before stamps: recognised by the demo stage's marker, regenerated.
    (out / STAMP).unlink()
    (out / "_SUCCESS").write_text(json.dumps({"config_hash": "2/train/20/2/0/False/4000000"}))
    demo_data.generate(str(out), samples=20, shards=2)
    # Someone else's data is refused by the generator itself (`mode-ray demo-data --out`, benchmarks).
    user = _user_dataset(tmp_path / "user")
    before = _tree_digest(user)
    with pytest.raises(NotOursError, match="did not write"):
        demo_data.generate(str(user), samples=20, shards=2)
    assert _tree_digest(user) == before


def test_a_run_root_of_someone_elses_is_refused_and_an_old_run_is_recognised(tmp_path):
    theirs = tmp_path / "project"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    cfg = load_config(DEMO, [*SMALL, f"run_root={theirs}"])
    with pytest.raises(NotOursError, match="not a mode_ray run"):
        run_all(cfg, only=["demo-data"])
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    # A run made before stamps: its resolved config.yaml says it is ours.
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "config.yaml").write_text(f"run_root: {old}\ndata: {{shards: x}}\n")
    claim_run_root(str(old))
    assert (old / STAMP).is_file()


def test_only_stamped_or_empty_folders_are_deleted(tmp_path):
    ours = tmp_path / "ours"
    fresh_dir(str(ours), "test output")
    (ours / "part-0.parquet").write_bytes(b"x")
    fresh_dir(str(ours), "test output")  # a rerun empties its own folder
    assert [p.name for p in ours.iterdir()] == [STAMP]
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "sub" / "data.bin").write_bytes(b"precious")
    for act in (
        lambda: remove_owned_tree(str(theirs)),
        lambda: fresh_dir(str(theirs), "x"),
        lambda: claim(str(theirs), "x"),
    ):
        with pytest.raises(NotOursError, match="did not write"):
            act()
    assert (theirs / "sub" / "data.bin").read_bytes() == b"precious"
    empty = tmp_path / "empty"
    (empty / "nested").mkdir(parents=True)
    remove_owned_tree(str(empty))
    assert not empty.exists()


def test_bench_quality_refuses_a_users_data_untouched(tmp_path):
    from tests.bench_in_background import bench as bench_module

    bench = bench_module("quality")
    user = _user_dataset(tmp_path / "held-out")
    before = _tree_digest(user)
    with pytest.raises(ValueError, match="did not write"):
        bench.main(["--root", str(tmp_path / "q"), "--set", f"eval.shards={user}"])
    assert _tree_digest(user) == before
    with pytest.raises(NotOursError):  # nor is a folder of theirs taken as the benchmark's root
        bench.main(["--root", str(user)])
    assert _tree_digest(user) == before


# Deleting goes through mode_ray.run_root.ownership alone (and the completion-marker reset in storage.clear_marker).
DELETES = {"rm", "rmtree", "remove", "unlink", "rmdir", "removedirs", "rm_file", "delete"}
MAY_DELETE = {"mode_ray/run_root/ownership.py": {"rm"}, "mode_ray/run_root/storage.py": {"rm"}}


def test_nothing_outside_ownership_deletes_files():
    found = []
    for path in [*REPO.glob("mode_ray/**/*.py"), *REPO.glob("jobs/*.py"), *REPO.glob("bench/*.py")]:
        rel = str(path.relative_to(REPO))
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            call = call and ast.unparse(node.func.value) != "serve"  # serve.delete(app): an app, not a file
            if call and node.func.attr in DELETES and node.func.attr not in MAY_DELETE.get(rel, set()):
                found.append(f"{rel}:{node.lineno} .{node.func.attr}()")
    assert found == []


# ----------------------------------------------------------------------------- resources


def test_a_gpu_setting_on_a_machine_without_one_fails_fast_and_leaves_no_process(tmp_path):
    shards = _user_dataset(tmp_path / "shards")
    # The CLI's own Ray lives here, so its processes can be told from the tests' (short: Ray's socket paths).
    ray_tmp = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    started = time.monotonic()
    proc = _mode_ray(
        "prep", "--config", str(DEMO), "--set", f"run_root={tmp_path / 'run'}", "--set", "data.demo=null",
        "--set", f"data.shards={shards}", "--set", "embedding.device=cuda", "--set", "embedding.num_gpus_per_actor=1",
        env={"RAY_TMPDIR": str(ray_tmp)},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "num_gpus_per_actor=1" in message and "0 GPU" in message and "Traceback" not in proc.stderr
    assert elapsed < 120  # Ray's start and one check; the bug it replaces waited until it was killed
    time.sleep(2)
    assert pids_naming(str(ray_tmp)) == []  # raylet, GCS and workers all gone
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_training_on_a_gpu_the_embedded_ray_lacks_fails_before_anything_is_written(trained_run):
    from mode_ray.ray_env.runtime import ResourceError
    from mode_ray.stages.train import run_train

    cfg, _, _ = trained_run
    runs = Path(cfg.run_root) / "train_runs"
    before = sorted(p.name for p in runs.iterdir())
    run = cfg.training.run.model_copy(update={"use_gpu": True})
    gpu = cfg.model_copy(update={"training": cfg.training.model_copy(update={"run": run})})
    with pytest.raises(ResourceError, match="use_gpu=True.*0 GPU"):
        run_train(gpu, force=True)  # use_gpu is how jobs run, not what they learn: nothing retrains without --force
    assert sorted(p.name for p in runs.iterdir()) == before


def test_shortfalls_name_what_can_never_be_placed():
    two_nodes = [{"CPU": 4.0}, {"CPU": 8.0, "GPU": 1.0}]
    assert shortfalls([Need("s", "actor", 2.0, 1.0)], two_nodes) == []
    assert "more than any node" in shortfalls([Need("s", "actor", 6.0, 1.0, count=1)], [{"CPU": 4.0}, {"CPU": 4.0}])[0]
    (together,) = shortfalls([Need("a", "actor", 1.0, 1.0, count=2)], two_nodes)
    assert together.startswith("this stage asks for 2 GPU") and "1 GPU" in together
    (cpus,) = shortfalls([Need("a", "actor", 4.0, count=3, extra_cpus=0.5)], two_nodes)
    assert "12.5 CPU" in cpus


def test_on_a_cluster_a_stage_waits_for_the_autoscaler_bounded_and_says_so(ray_session, monkeypatch, capsys):
    from mode_ray.ray_env import runtime

    cfg = load_config(DEMO, ["ray.resource_wait_s=1.5"])
    monkeypatch.setattr(runtime, "cluster_address", lambda _cfg: "auto")  # as if joined to a cluster
    gpu = [Need("eval.use_gpu=True", "image-feature actor", 1.0, 1.0)]
    started = time.monotonic()
    with pytest.raises(runtime.ResourceError, match="after 2s|after 1s"):
        runtime.require_resources(cfg, gpu, "eval", poll_s=0.2, report_s=0.5)
    assert 1.5 <= time.monotonic() - started < 10
    printed = capsys.readouterr()
    assert "eval: waiting up to 2s for the autoscaler" in printed.out + printed.err
    # A node with a GPU arrives while it waits: the stage goes on.
    arrivals = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]])
    monkeypatch.setattr(runtime, "_alive_nodes", lambda: next(arrivals))
    runtime.require_resources(cfg, gpu, "eval", poll_s=0.05)
